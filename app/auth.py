"""Credentials for ``--auth`` / ``--auth-file`` (A1111 syntax: ``user:pass,user2:pass2``)."""

from __future__ import annotations

from pathlib import Path


def parse_credentials(
    auth: str | None, auth_file: Path | None = None, *, flag: str = "--auth"
) -> list[tuple[str, str]]:
    """All ``(user, password)`` pairs; a malformed entry is an error naming it (and ``flag``)."""
    entries: list[str] = []
    if auth:
        entries += [part for part in auth.split(",") if part.strip()]
    if auth_file:
        text = Path(auth_file).read_text(encoding="utf-8")
        entries += [part for line in text.splitlines() for part in line.split(",") if part.strip()]
    pairs = []
    for entry in entries:
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{flag}: '{entry.strip()}' is not of the form user:password")
        pairs.append((user, password))
    return pairs
