"""Ray token authentication, always on: the head makes the token, every node and driver presents it.

Ray (2.60) reads ``RAY_AUTH_MODE=token`` and the token from ``RAY_AUTH_TOKEN`` in the environment of
every process of the cluster. A node or driver without the right token is refused by the head's GCS,
but ``ray.init``/``ray start`` only say so as a generic ConnectionError after ~20 s; a direct GCS
request with our token answers in milliseconds, so :func:`check_token` asks first and says what is wrong.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_FILE = "cluster_token"
TOKEN_ENV = "RAY_AUTH_TOKEN"
MODE_ENV = "RAY_AUTH_MODE"
STUDIO_TOKEN_ENV = "SDSTUDIO_CLUSTER_TOKEN"


class ClusterAuthError(RuntimeError):
    """The head refused this PC's token (or none was given)."""


def head_token(data_dir: Path) -> str:
    """The cluster's token: made once on the head and kept in ``data/cluster_token`` (owner-only)."""
    path = data_dir / TOKEN_FILE
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(token + "\n", encoding="utf-8")
    os.chmod(temp, 0o600)
    os.replace(temp, path)
    return token


def joining_token(data_dir: Path, given: str | None) -> str | None:
    """A joining PC's token: ``--cluster-token``, else ``SDSTUDIO_CLUSTER_TOKEN``, else a copy of the
    head's file in this PC's ``data/cluster_token``."""
    if given:
        return given.strip()
    from_env = os.environ.get(STUDIO_TOKEN_ENV)
    if from_env:
        return from_env.strip()
    path = data_dir / TOKEN_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip() or None
    return None


def auth_environment(token: str) -> dict[str, str]:
    """The variables every Ray process of the studio runs with."""
    return {MODE_ENV: "token", TOKEN_ENV: token}


def apply_auth_environment(token: str) -> None:
    """Put the token into this process's environment (Ray reads it there, its children inherit it)."""
    os.environ.update(auth_environment(token))


def check_token(address: str, token: str | None, *, timeout: float = 5.0) -> None:
    """Raise :class:`ClusterAuthError` with a clear message when the head at ``address`` refuses
    ``token``; return quietly when it accepts it. Other failures (no head there) are left to Ray."""
    if not token:
        raise ClusterAuthError(
            "No cluster token: copy data/cluster_token from the head PC into this PC's data/ folder, "
            f"or pass --cluster-token TOKEN (or set {STUDIO_TOKEN_ENV})."
        )
    apply_auth_environment(token)
    try:
        from ray._raylet import GcsClient
    except ImportError:  # a Ray without this client: ray.init will tell
        return
    try:
        client = GcsClient(address=address)
        client.internal_kv_get(b"sdstudio-token-check", namespace=None, timeout=timeout)
    except Exception as exc:  # Ray raises several types here; only the auth one matters
        if "auth" in type(exc).__name__.lower() or "unauthenticated" in str(exc).lower():
            raise ClusterAuthError(
                f"The cluster head at {address} refused this PC's token. Use the token the head printed "
                "(its data/cluster_token): --cluster-token TOKEN, or copy that file into this PC's data/."
            ) from None
