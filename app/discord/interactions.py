"""``POST /discord/interactions``: Discord's HTTP interactions endpoint.

Discord, not a studio user, calls this route, so it is authenticated by Discord's Ed25519 signature
(``X-Signature-Ed25519`` over ``X-Signature-Timestamp`` + body, against ``DISCORD_PUBLIC_KEY``)
instead of the API's HTTP Basic auth: a bad or missing signature, a stale timestamp or a replayed
request gets 401 before the body is even parsed. A PING is answered ``{"type": 1}``; a /draw is
recorded and answered ``{"type": 5}`` (deferred) at once, whatever the queue holds: the work starts
after the answer has been sent. Without ``DISCORD_PUBLIC_KEY`` the route answers 503.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.discord.config import DiscordConfig, DiscordConfigError, load_discord_config
from app.discord.frontend import DiscordFrontEnd, draw_from_payload, shared_frontend
from app.discord.signature import SignatureError, SignatureVerifier

if TYPE_CHECKING:
    from app.services import StudioServices

log = logging.getLogger(__name__)

PING = 1
APPLICATION_COMMAND = 2
PONG = 1
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5
EPHEMERAL = 64


def discord_router(
    services: StudioServices,
    *,
    config: DiscordConfig | None = None,
    frontend: DiscordFrontEnd | None = None,
    resume: bool = True,
) -> APIRouter:
    """The interactions route. With Discord configured, requests a restart left unanswered are
    taken up again at once (``resume``), by the process's one front end (:func:`shared_frontend`).
    A ``frontend`` given (tests) is used as it is."""
    router = APIRouter(tags=["discord"])
    verifier: SignatureVerifier | None = None
    problem = "Discord is not configured: set DISCORD_PUBLIC_KEY (see README, 'Run a community event')."
    try:
        config = config or load_discord_config(services.settings.data_dir)
        if config.public_key:
            verifier = SignatureVerifier(config.public_key, max_age_seconds=config.signature_max_age_seconds)
    except (DiscordConfigError, ValueError) as exc:
        problem = f"Discord settings are unusable: {exc}"
        log.error("%s", problem)
        config = None
    if verifier is not None and config is not None and frontend is None:
        frontend = shared_frontend(services, config) if resume else DiscordFrontEnd(services, config)

    @router.post("/discord/interactions", include_in_schema=False)
    async def interactions(request: Request, background: BackgroundTasks) -> Any:
        if verifier is None or frontend is None:
            return JSONResponse(status_code=503, content={"error": "DiscordNotConfigured", "detail": problem})
        body = await request.body()
        try:
            verifier.verify(
                request.headers.get("X-Signature-Ed25519"), request.headers.get("X-Signature-Timestamp"), body
            )
        except SignatureError as exc:
            log.info("Discord interaction refused: %s", exc)
            return JSONResponse(
                status_code=401, content={"error": "Unauthorized", "detail": "invalid request signature"}
            )
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse(
                status_code=400, content={"error": "BadRequest", "detail": "body is not JSON"}
            )
        if not isinstance(payload, dict):
            return JSONResponse(
                status_code=400, content={"error": "BadRequest", "detail": "body is not an object"}
            )
        kind = payload.get("type")
        if kind == PING:
            return {"type": PONG}
        if kind == APPLICATION_COMMAND and (payload.get("data") or {}).get("name") == "draw":
            draw = draw_from_payload(payload)
            if await run_in_threadpool(frontend.accept, draw):
                background.add_task(frontend.start, draw)  # runs once the deferral has been sent
            return {"type": DEFERRED_CHANNEL_MESSAGE}
        if kind == APPLICATION_COMMAND:
            return {"type": CHANNEL_MESSAGE, "data": {"content": "I only know /draw.", "flags": EPHEMERAL}}
        return JSONResponse(
            status_code=400, content={"error": "BadRequest", "detail": f"interaction type {kind}"}
        )

    router.state_frontend = frontend  # type: ignore[attr-defined]  # for shutdown and tests
    return router
