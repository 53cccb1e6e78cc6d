"""``launch.py bot``: the Discord gateway bot (discord.py), for a studio without a public URL.

The bot keeps an outgoing connection to Discord, so it works behind a LAN's NAT. Its /draw command
defers the interaction, then hands it to the same :class:`DiscordFrontEnd` the HTTP interactions
endpoint uses: same checks, same queue, same answers (by editing the deferred response through
the webhook API with the interaction's token). discord.py is optional (``requirements-discord.txt``)
and installed into the studio's Python the first time the bot is started.

``launch.py bot`` also serves the studio's UI and API in the same process (one queue for the
players and the organisers; ``--headless`` for the bot alone). ``launch.py bot register
[--guild ID]`` registers the slash command (plain HTTP, no discord.py).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

from app.discord.frontend import Attachment, DiscordFrontEnd, DrawCommand, shared_frontend
from app.settings import REPO_ROOT

if TYPE_CHECKING:
    import argparse

    import discord

    from app.services import StudioServices
    from app.settings import StudioSettings

log = logging.getLogger(__name__)

OPTIONAL_REQUIREMENTS = REPO_ROOT / "requirements-discord.txt"


def ensure_discord_py() -> None:
    """Install discord.py (pinned in requirements-discord.txt) on first use."""
    if importlib.util.find_spec("discord") is not None:
        return
    print(f"Installing the Discord bot's requirements ({OPTIONAL_REQUIREMENTS.name})...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "-r", str(OPTIONAL_REQUIREMENTS)], check=True
    )
    importlib.invalidate_caches()


def draw_command(
    interaction: discord.Interaction, photo: discord.Attachment | None, prompt: str, preset: str | None
) -> DrawCommand:
    """The /draw as the shared handler takes it, from discord.py's objects."""
    return DrawCommand(
        interaction_id=str(interaction.id),
        application_id=str(interaction.application_id),
        token=interaction.token,
        user_id=str(interaction.user.id),
        channel_id=str(interaction.channel_id) if interaction.channel_id else None,
        prompt=prompt or "",
        preset=preset or None,
        photo=(
            Attachment(
                url=photo.url, filename=photo.filename, size=photo.size, content_type=photo.content_type
            )
            if photo is not None
            else None
        ),
    )


async def handle_draw(
    frontend: DiscordFrontEnd,
    interaction: discord.Interaction,
    photo: discord.Attachment | None,
    prompt: str,
    preset: str | None = None,
) -> DrawCommand:
    """Defer at once (Discord's 3-second limit), then record the /draw and start it."""
    await interaction.response.defer(thinking=True)
    draw = draw_command(interaction, photo, prompt, preset)
    if await asyncio.to_thread(frontend.accept, draw):
        frontend.start(draw)
    return draw


def build_bot(frontend: DiscordFrontEnd) -> discord.Client:
    """A client whose command tree has /draw, handled by ``frontend``."""
    import discord
    from discord import app_commands

    client = discord.Client(intents=discord.Intents.none())
    tree = app_commands.CommandTree(client)

    async def draw(
        interaction: discord.Interaction, photo: discord.Attachment, prompt: str, preset: str | None = None
    ) -> None:
        await handle_draw(frontend, interaction, photo, prompt, preset)

    # discord.py reads the option types from the annotations; this module's are strings
    # (postponed evaluation) naming a module it imports only here, so they are given as objects.
    draw.__annotations__ = {
        "interaction": discord.Interaction,
        "photo": discord.Attachment,
        "prompt": str,
        "preset": str | None,
        "return": None,
    }
    described = app_commands.describe(
        photo="Your photo (JPEG, PNG, WebP or HEIC)",
        prompt="A few words: what to draw",
        preset="Style preset (default: this channel's)",
    )(draw)
    tree.command(name="draw", description="Redraw your photo in the event's style")(described)
    client.tree = tree  # type: ignore[attr-defined]
    return client


def run_bot(args: argparse.Namespace, settings: StudioSettings) -> int:
    """``launch.py bot`` (run the gateway bot) and ``launch.py bot register``."""
    from app.discord.api import DiscordApi, DiscordHttpError
    from app.discord.config import DiscordConfigError, load_discord_config

    try:
        config = load_discord_config(settings.data_dir)
    except DiscordConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.application_id or not config.bot_token_value():
        print(
            "error: set DISCORD_APPLICATION_ID and DISCORD_BOT_TOKEN (environment or data/discord.json); "
            "see README, 'Run a community event'.",
            file=sys.stderr,
        )
        return 2
    if getattr(args, "action", "run") == "register":
        api = DiscordApi(config)
        try:
            commands = api.register_commands(config.application_id, getattr(args, "guild", None))
        except DiscordHttpError as exc:
            print(f"error: registering /draw failed: {exc}", file=sys.stderr)
            return 1
        finally:
            api.close()
        where = f"server {args.guild}" if getattr(args, "guild", None) else "every server (may take an hour)"
        print(f"registered {', '.join('/' + str(c.get('name')) for c in commands)} for {where}")
        return 0
    ensure_discord_py()
    return _serve_bot(settings, config, headless=bool(getattr(args, "headless", False)))


def serve_studio_beside_bot(services: StudioServices) -> None:
    """Serve the UI and the API (as ``launch.py --api`` does; ``--nowebui``: the API alone) on a
    thread of the bot's process. The bot owns the studio's queue and workers, so a second studio
    process on the same data folder would take up the same jobs; this way the organisers still
    have the UI (Queue tab, the Presets tab to try a preset) and one queue serves everyone."""
    import uvicorn

    from app.server import build_served_app, studio_credentials

    settings = services.settings
    ui_credentials, api_credentials = studio_credentials(settings)
    if settings.listen and not api_credentials:
        log.warning("--listen without --auth/--api-auth: anyone on your network can use this studio")
    app = build_served_app(services, ui_credentials, api_credentials)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info"))
    threading.Thread(target=server.run, name="studio-server", daemon=True).start()
    log.info("studio UI/API on http://%s:%s beside the Discord bot", settings.host, settings.port)


def _serve_bot(settings: StudioSettings, config: Any, *, headless: bool = False) -> int:
    import discord
    from discord.http import Route

    from app.services import StudioServices

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Route.BASE = config.api_base  # DISCORD_API_BASE for discord.py's own calls too
    services = StudioServices.create(settings)
    services.start_queue()
    frontend = shared_frontend(services, config)  # the HTTP route of the served API shares it
    if not headless:
        serve_studio_beside_bot(services)
    client = build_bot(frontend)
    try:
        client.run(config.bot_token_value(), log_handler=None)
    except discord.LoginFailure:
        print("error: Discord refused DISCORD_BOT_TOKEN; copy the bot's token again.", file=sys.stderr)
        return 1
    finally:
        frontend.stop()
        services.queue.stop()
    return 0
