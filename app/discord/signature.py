"""Discord's request signatures: Ed25519 over ``timestamp + body``, checked with pynacl.

A request is accepted only when its signature verifies against the application's public key, its
timestamp is recent (``max_age`` seconds either way), and that exact signature has not been seen
before within the window: a captured request cannot be replayed, now or later.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class SignatureError(Exception):
    """Why a request was refused (logged; the client gets a plain 401)."""


class SignatureVerifier:
    def __init__(
        self,
        public_key_hex: str,
        *,
        max_age_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
        max_remembered: int = 100_000,
    ) -> None:
        from nacl.exceptions import CryptoError
        from nacl.signing import VerifyKey

        try:
            self._key = VerifyKey(bytes.fromhex(public_key_hex.strip()))
        except (ValueError, CryptoError, TypeError) as exc:
            raise ValueError("DISCORD_PUBLIC_KEY is not a 64-digit hex Ed25519 public key") from exc
        self.max_age = max_age_seconds
        self.clock = clock
        self.max_remembered = max_remembered
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, signature_hex: str | None, timestamp: str | None, body: bytes) -> None:
        """Raise :class:`SignatureError` unless the request is authentic, fresh and new."""
        from nacl.exceptions import BadSignatureError

        if not signature_hex or not timestamp:
            raise SignatureError("missing X-Signature-Ed25519 or X-Signature-Timestamp")
        try:
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            raise SignatureError("signature is not hex") from None
        if len(signature) != 64:
            raise SignatureError("signature has the wrong length")
        try:
            self._key.verify(timestamp.encode("utf-8") + body, signature)
        except BadSignatureError:
            raise SignatureError("bad signature") from None
        try:
            sent = float(timestamp)
        except ValueError:
            raise SignatureError("timestamp is not a number") from None
        now = self.clock()
        if abs(now - sent) > self.max_age:
            raise SignatureError("stale timestamp")
        with self._lock:
            for key, seen_at in list(self._seen.items()):  # oldest first: drop what left the window
                if now - seen_at <= 2 * self.max_age and len(self._seen) < self.max_remembered:
                    break
                del self._seen[key]
            if signature_hex in self._seen:
                raise SignatureError("replayed request")
            self._seen[signature_hex] = now
