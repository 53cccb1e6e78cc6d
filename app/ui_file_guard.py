"""Gradio's file route serves ``outputs/`` to the user whose job made each file, as the API does.

The UI lists ``outputs/`` in Gradio's ``allowed_paths`` so galleries show finished images without
copying them; Gradio then serves any file there to any logged-in user by its path
(``/gradio_api/file=<path>``), and output names are a counter plus a seed, easily guessed. With
``--auth`` (or ``--api-auth``, which the UI takes too), this guard sits in front of the mounted
Gradio app and answers 404 for an output file that no job of the logged-in user wrote, unless
``--share-outputs`` is given. Files outside ``outputs/`` (Gradio's own upload cache) are left to Gradio.

It is installed as a middleware of Gradio's own app (``app_kwargs``), where ``scope["app"]`` is that
app and holds the login tokens Gradio's cookies name.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

FILE_ROUTE_MARKERS = ("/file=",)


class OutputOwners(Protocol):
    def owner_of_output(self, path: str | Path) -> str | None: ...


class UiOutputFilesGuard:
    """ASGI middleware of Gradio's app (see the module docstring)."""

    def __init__(self, app: Any, *, outputs_dir: Path, owners: OutputOwners) -> None:
        self.app = app
        self.outputs_dir = outputs_dir.resolve()
        self.owners = owners

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            requested = requested_file(scope)
            user = self._logged_in_user(scope) if requested is not None else None
            # Not logged in: Gradio itself answers 401.
            if user is not None and self._inside_outputs(requested) and not self._may_read(user, requested):
                await _not_found(send)
                return
        await self.app(scope, receive, send)

    def _inside_outputs(self, requested: str) -> bool:
        try:
            return Path(requested).resolve().is_relative_to(self.outputs_dir)
        except (OSError, ValueError):
            return False

    def _may_read(self, user: str, requested: str) -> bool:
        owner = self.owners.owner_of_output(requested)
        if owner is None:
            owner = self.owners.owner_of_output(Path(requested).resolve())
        # UI jobs are recorded under the login name, API jobs under "user:<name>": the same person.
        return owner is not None and owner in (user, f"user:{user}")

    def _logged_in_user(self, scope: Any) -> str | None:
        gradio_app = scope.get("app")
        cookie_id = getattr(gradio_app, "cookie_id", "")
        tokens = getattr(gradio_app, "tokens", {}) or {}
        jar = SimpleCookie()
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                try:
                    jar.load(value.decode("latin-1"))
                except Exception:
                    return None
        for key in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            morsel = jar.get(key)
            if morsel is not None and morsel.value in tokens:
                return str(tokens[morsel.value])
        return None


def requested_file(scope: Any) -> str | None:
    """The file path a Gradio file route asks for, decoded; None for any other route."""
    path = str(scope.get("path", ""))
    for marker in FILE_ROUTE_MARKERS:
        head, found, tail = path.partition(marker)
        if found and head in ("", "/gradio_api"):
            return unquote(tail)
    return None


def output_guard_kwargs(services: Any, credentials: list[tuple[str, str]]) -> dict[str, Any]:
    """``app_kwargs`` for Gradio's ``launch``/``mount_gradio_app``: the guard when users log in and
    outputs are not shared, else nothing (without auth everyone is one user)."""
    if not credentials or services.settings.share_outputs:
        return {}
    from starlette.middleware import Middleware

    guard = Middleware(UiOutputFilesGuard, outputs_dir=services.outputs_root, owners=services.queue.store)
    return {"middleware": [guard]}


async def _not_found(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"detail":"Not Found"}'})
