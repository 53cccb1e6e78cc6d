"""Who is calling: HTTP Basic for ``--api-auth`` (A1111's flag) and the owner name jobs are queued under.

Every router, the file server and the OpenAPI pages depend on :meth:`ApiAuth.require_user`, so no
route can be added without it by accident: the app factory passes it to each router. Passwords are
compared in constant time, and a wrong user name costs the same comparison as a wrong password so
response times do not reveal which user names exist.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, field

from fastapi import HTTPException, Request, status

_CHALLENGE = {"WWW-Authenticate": 'Basic realm="SD Studio"'}
# Compared against when the user name is unknown, so both failures take the same time.
_DUMMY_PASSWORD = secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Caller:
    """The authenticated user (None when the API runs without auth) and the queue owner name."""

    user: str | None
    owner: str

    @property
    def authenticated(self) -> bool:
        return self.user is not None


@dataclass
class ApiAuth:
    """Credentials from ``--api-auth`` (or ``--auth`` when only that is given); empty = open API."""

    credentials: list[tuple[str, str]] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.credentials)

    def check(self, user: str, password: str) -> bool:
        matched = False
        for known_user, known_password in self.credentials:
            user_ok = secrets.compare_digest(user.encode("utf-8"), known_user.encode("utf-8"))
            password_ok = secrets.compare_digest(
                password.encode("utf-8"), (known_password if user_ok else _DUMMY_PASSWORD).encode("utf-8")
            )
            matched |= user_ok and password_ok
        return matched

    def require_user(self, request: Request) -> Caller:
        """FastAPI dependency: 401 with a Basic challenge unless the request carries valid
        credentials (when auth is on). Without auth, jobs are owned by the client address."""
        if not self.enabled:
            host = request.client.host if request.client else "unknown"
            return Caller(user=None, owner=f"client:{host}")
        user, password = _basic_credentials(request.headers.get("authorization"))
        if user is None or password is None or not self.check(user, password):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="Incorrect username or password (this server needs HTTP Basic auth: --api-auth).",
                headers=_CHALLENGE,
            )
        return Caller(user=user, owner=f"user:{user}")


def _basic_credentials(header: str | None) -> tuple[str | None, str | None]:
    if not header:
        return None, None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None, None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None, None
    return user, password
