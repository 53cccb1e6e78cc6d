"""The Discord front end against local stand-ins for Discord's API and CDN (127.0.0.1 only).

Requests are signed with a real Ed25519 key made here; the gateway bot's /draw is dispatched by
discord.py's own command tree from a discord.py ``Interaction`` (its HTTP adapter replaced, so no
network). Jobs run through the studio's durable queue on the tiny SD1 model.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from nacl.encoding import HexEncoder
from nacl.signing import SigningKey
from PIL import Image

from app.discord.config import DiscordConfig, load_discord_config
from app.discord.frontend import DiscordFrontEnd
from app.discord.interactions import discord_router
from app.presets import PresetStore, preset_from_request
from app.services import StudioServices
from app.settings import StudioSettings

WAIT = 120.0
PRESET_REQUEST = {
    "prompt": "sticker of {prompt}",
    "sampler_name": "Euler",
    "steps": 2,
    "denoising_strength": 0.6,
    "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
}


# --------------------------------------------------------------------------------------------
# stand-ins for Discord's API and CDN
# --------------------------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def parts(self) -> dict[str, bytes]:
        """A multipart body's parts by name."""
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + self.body)
        return {
            str(part.get_param("name", header="content-disposition")): part.get_payload(decode=True)
            for part in message.iter_parts()
        }

    def content(self) -> str:
        if self.headers.get("Content-Type", "").startswith("multipart/"):
            return json.loads(self.parts()["payload_json"])["content"]
        return self.json()["content"]


class StandIn:
    """A tiny HTTP server: serves ``files`` on GET, answers everything else 200 (or what ``plan``
    says first), and records every request."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.files: dict[str, bytes] = {}
        self.plan: deque[tuple[Callable[[Seen], bool], int, dict[str, Any]]] = deque()
        self.changed = threading.Condition()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, dict(self.headers), self.rfile.read(length))
                status, body, kind = stand_in.answer(seen)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with stand_in.changed:
                    stand_in.seen.append(seen)
                    stand_in.changed.notify_all()

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def do_PATCH(self) -> None:
                self._handle()

            def do_PUT(self) -> None:
                self._handle()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, seen: Seen) -> tuple[int, bytes, str]:
        if seen.method == "GET":
            data = self.files.get(seen.path)
            return (200, data, "image/png") if data is not None else (404, b"{}", "application/json")
        if self.plan and self.plan[0][0](seen):
            _, status, body = self.plan.popleft()
            return status, json.dumps(body).encode(), "application/json"
        if seen.method == "PUT":
            return (
                200,
                json.dumps([{"id": "1", **cmd} for cmd in json.loads(seen.body)]).encode(),
                "application/json",
            )
        return 200, b'{"id": "m-1"}', "application/json"

    def wait_for(self, match: Callable[[Seen], bool], count: int = 1) -> list[Seen]:
        with self.changed:
            assert self.changed.wait_for(lambda: len([s for s in self.seen if match(s)]) >= count, WAIT), (
                self.seen
            )
            return [s for s in self.seen if match(s)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def discord_site() -> Iterator[StandIn]:
    site = StandIn()
    yield site
    site.close()


@pytest.fixture()
def signing_key() -> SigningKey:
    return SigningKey.generate()


def photo_png(size: tuple[int, int] = (96, 64)) -> bytes:
    image = Image.new("RGB", size, (30, 60, 200))
    image.paste((240, 200, 10), (8, 8, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def settings_for(tmp_path: Path, models: Path) -> StudioSettings:
    return StudioSettings(
        models_dir=models,
        data_dir=tmp_path / "data",
        outputs_dir=tmp_path / "outputs",
        presets_dir=tmp_path / "presets",
        default_checkpoint="tiny-sd1",
        in_process_workers=True,
        device_ids=["cpu"],
    )


@pytest.fixture()
def idle_services(tmp_path: Path, tiny_models_root: Path, studio) -> StudioServices:
    """Services whose queue is never started: every job stays waiting (a busy studio)."""
    services = StudioServices.create(settings_for(tmp_path, tiny_models_root))
    store = PresetStore.for_services(services)
    store.save(
        preset_from_request("default", "img2img", PRESET_REQUEST, longest_side=96, blocked_words=["gore"]),
        studio.registry,
    )
    return services


def config_for(site: StandIn, key: SigningKey, **extra: Any) -> DiscordConfig:
    values: dict[str, Any] = {
        "application_id": "app-1",
        "public_key": key.verify_key.encode(HexEncoder).decode(),
        "bot_token": "bot-secret-token",
        "api_base": site.url,
        "attachment_hosts": (site.url,),
        "progress_every_seconds": 0,
        "rate_limit": 100,
        "daily_quota": 100,
        **extra,
    }
    return DiscordConfig(**values)


@dataclass
class Endpoint:
    client: TestClient
    frontend: DiscordFrontEnd
    key: SigningKey

    def post(
        self, payload: dict[str, Any], *, timestamp: str | None = None, key: SigningKey | None = None
    ) -> Any:
        body = json.dumps(payload).encode()
        stamp = timestamp or str(int(time.time()))
        signature = (key or self.key).sign(stamp.encode() + body).signature.hex()
        return self.client.post(
            "/discord/interactions",
            content=body,
            headers={
                "X-Signature-Ed25519": signature,
                "X-Signature-Timestamp": stamp,
                "Content-Type": "application/json",
            },
        )


def endpoint_for(
    services: StudioServices, config: DiscordConfig, key: SigningKey, **frontend_options: Any
) -> Endpoint:
    frontend = DiscordFrontEnd(services, config, **frontend_options)
    app = FastAPI()
    app.include_router(discord_router(services, config=config, frontend=frontend))
    return Endpoint(TestClient(app), frontend, key)


def draw(
    number: int,
    site: StandIn,
    *,
    url: str | None = None,
    size: int | None = None,
    prompt: str = "a knight",
    preset: str | None = None,
    user: str = "user-1",
    channel: str = "chan-1",
    photo: bool = True,
) -> dict[str, Any]:
    options: list[dict[str, Any]] = [{"name": "prompt", "type": 3, "value": prompt}]
    resolved: dict[str, Any] = {}
    if photo:
        options.append({"name": "photo", "type": 11, "value": f"att-{number}"})
        link = url or f"{site.url}/attachments/photo-{number}.png"
        resolved = {
            "attachments": {
                f"att-{number}": {
                    "id": f"att-{number}",
                    "filename": "photo.png",
                    "url": link,
                    "size": size or 1000,
                }
            }
        }
    if preset:
        options.append({"name": "preset", "type": 3, "value": preset})
    return {
        "id": f"interaction-{number}",
        "application_id": "app-1",
        "type": 2,
        "token": f"token-{number}",
        "channel_id": channel,
        "member": {"user": {"id": user}},
        "data": {"id": "cmd", "name": "draw", "type": 1, "options": options, "resolved": resolved},
    }


def original(number: int) -> Callable[[Seen], bool]:
    path = f"/webhooks/app-1/token-{number}/messages/@original"
    return lambda seen: seen.method == "PATCH" and seen.path == path


def answer_text(site: StandIn, number: int) -> str:
    """The last edit of interaction ``number`` once it has been answered."""
    return site.wait_for(original(number))[-1].content()


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_signatures_ping_stale_and_replayed(
    idle_services, discord_site: StandIn, signing_key: SigningKey
) -> None:
    endpoint = endpoint_for(idle_services, config_for(discord_site, signing_key), signing_key)
    stamp = str(int(time.time()))
    first = endpoint.post({"type": 1}, timestamp=stamp)
    assert first.status_code == 200 and first.json() == {"type": 1}
    replayed = endpoint.post({"type": 1}, timestamp=stamp)  # the very same signed request again
    assert replayed.status_code == 401
    assert endpoint.post({"type": 1}, timestamp=str(int(time.time()) - 3600)).status_code == 401
    assert endpoint.post({"type": 1}, key=SigningKey.generate()).status_code == 401
    unsigned = endpoint.client.post("/discord/interactions", json={"type": 1})
    assert unsigned.status_code == 401
    forged = endpoint.client.post(
        "/discord/interactions",
        json={"type": 1},
        headers={"X-Signature-Ed25519": "00" * 64, "X-Signature-Timestamp": str(int(time.time()))},
    )
    assert forged.status_code == 401
    assert discord_site.seen == []


def test_draw_is_deferred_while_busy_and_answered_with_the_png_after_a_restart(
    tmp_path: Path, idle_services, discord_site: StandIn, signing_key: SigningKey, studio
) -> None:
    discord_site.files["/attachments/photo-1.png"] = photo_png()
    config = config_for(discord_site, signing_key)
    endpoint = endpoint_for(idle_services, config, signing_key)

    answer = endpoint.post(draw(1, discord_site))  # nothing runs: the studio is "busy"
    assert answer.status_code == 200 and answer.json() == {"type": 5}
    queued = discord_site.wait_for(lambda s: original(1)(s) and "Queued" in s.content())
    assert queued[0].json()["content"].startswith("Queued")
    job_id = endpoint.frontend.store.get("interaction-1").job_id
    assert job_id and idle_services.queue.status(job_id).owner == "discord:user-1"
    endpoint.frontend.stop()

    # the studio restarts (same data folder); Discord rate-limits the first try of the answer
    discord_site.plan.append(
        (
            lambda s: original(1)(s) and "multipart" in s.headers.get("Content-Type", ""),
            429,
            {"retry_after": 0.05},
        )
    )
    restarted = StudioServices.create(settings_for(tmp_path, idle_services.settings.models_dir))
    restarted.__dict__["engine"] = studio.engine  # the loaded tiny model, shared to save time
    restarted.start_queue()
    frontend = DiscordFrontEnd(restarted, config)
    try:
        assert frontend.resume() == ["interaction-1"]
        finals = discord_site.wait_for(
            lambda s: original(1)(s) and "multipart" in s.headers.get("Content-Type", ""), count=2
        )
        frontend.join(WAIT)
    finally:
        frontend.stop()
        restarted.queue.stop()
    parts = finals[-1].parts()
    payload = json.loads(parts["payload_json"])
    picture = Image.open(io.BytesIO(parts["files[0]"]))
    assert picture.format == "PNG" and picture.size == (96, 64)
    seed = picture.text["parameters"].split("Seed: ")[1].split(",")[0]
    assert f"seed {seed}" in payload["content"] and "<@user-1>" in payload["content"]
    assert payload["attachments"] == [{"id": 0, "filename": f"draw-{seed}.png"}]
    assert restarted.queue.status(job_id).state == "done"
    assert frontend.store.unanswered() == []


def test_attachments_outside_the_allow_list_are_never_fetched(
    idle_services, discord_site: StandIn, signing_key: SigningKey
) -> None:
    lan = StandIn()  # a machine "inside the LAN" the crafted link points at
    lan.files["/secret.png"] = photo_png()
    try:
        endpoint = endpoint_for(idle_services, config_for(discord_site, signing_key), signing_key)
        assert endpoint.post(draw(1, discord_site, url=f"{lan.url}/secret.png")).json() == {"type": 5}
        assert "not from Discord" in answer_text(discord_site, 1)
        assert endpoint.post(
            draw(2, discord_site, url="https://user:pw@cdn.discordapp.com/x.png")
        ).json() == {"type": 5}
        assert "not from Discord" in answer_text(discord_site, 2)
        endpoint.frontend.join(WAIT)
        assert lan.seen == []
        assert not [s for s in discord_site.seen if s.method == "GET"]
    finally:
        lan.close()


def test_rate_limit_and_daily_quota_messages(
    idle_services, discord_site: StandIn, signing_key: SigningKey
) -> None:
    for number in (1, 2, 3):
        discord_site.files[f"/attachments/photo-{number}.png"] = photo_png()
    config = config_for(discord_site, signing_key, rate_limit=2, daily_quota=1)
    endpoint = endpoint_for(idle_services, config, signing_key)
    assert endpoint.post(draw(1, discord_site)).json() == {"type": 5}
    assert answer_text(discord_site, 1).startswith("Queued")
    assert endpoint.post(draw(2, discord_site)).json() == {"type": 5}
    assert "used your 1 drawings for today" in answer_text(discord_site, 2)
    assert endpoint.post(draw(3, discord_site)).json() == {"type": 5}
    assert "Slow down" in answer_text(discord_site, 3)
    assert endpoint.post(draw(4, discord_site, user="user-2", photo=False)).json() == {"type": 5}
    assert "Attach a photo" in answer_text(discord_site, 4)  # another user is not limited by user-1
    endpoint.frontend.stop()


def test_short_messages_for_unusable_requests(
    idle_services, discord_site: StandIn, signing_key: SigningKey
) -> None:
    discord_site.files["/attachments/photo-2.png"] = b"this is not an image"
    discord_site.files["/attachments/photo-3.png"] = photo_png((1200, 900))
    config = config_for(discord_site, signing_key, max_attachment_mb=0.001)
    endpoint = endpoint_for(idle_services, config, signing_key)
    cases = {
        1: (draw(1, discord_site, size=50_000), "larger than"),  # Discord says it is large: not fetched
        2: (draw(2, discord_site, size=100), "not a photo I can read"),
        3: (draw(3, discord_site, size=100), "larger than"),  # it said small, but the bytes were not
        4: (draw(4, discord_site, preset="nope"), "no preset 'nope'"),
        5: (draw(5, discord_site, prompt="gore and more"), "'gore' is not allowed"),
    }
    discord_site.files["/attachments/photo-5.png"] = photo_png((40, 30))
    for payload, _ in cases.values():
        assert endpoint.post(payload).json() == {"type": 5}
    for number, (_, expected) in cases.items():
        text = answer_text(discord_site, number)
        assert expected in text, (number, text)
        assert len(text) < 200
    endpoint.frontend.join(WAIT)
    assert not [s for s in discord_site.seen if s.path == "/attachments/photo-1.png"]


def test_after_the_token_expires_the_bot_answers_in_the_channel(
    idle_services, discord_site: StandIn, signing_key: SigningKey
) -> None:
    offset = [0.0]
    endpoint = endpoint_for(
        idle_services,
        config_for(discord_site, signing_key),
        signing_key,
        clock=lambda: time.time() + offset[0],
    )
    payload = draw(1, discord_site, preset="nope")
    assert endpoint.frontend.accept(endpoint_draw(payload))
    offset[0] = 20 * 60.0  # the studio was down for 20 minutes: the interaction token is gone
    endpoint.frontend.start(endpoint_draw(payload))
    posted = discord_site.wait_for(lambda s: s.method == "POST" and s.path == "/channels/chan-1/messages")
    assert posted[0].headers["Authorization"] == "Bot bot-secret-token"
    assert "no preset 'nope'" in posted[0].json()["content"]
    assert not [s for s in discord_site.seen if s.method == "PATCH"]


def endpoint_draw(payload: dict[str, Any]) -> Any:
    from app.discord.frontend import draw_from_payload

    return draw_from_payload(payload)


def test_gateway_bot_commands_go_through_the_same_handler(
    idle_services, discord_site: StandIn, signing_key: SigningKey
) -> None:
    import discord
    from discord.webhook.async_ import async_context

    from app.discord.gateway import build_bot

    frontend = DiscordFrontEnd(idle_services, config_for(discord_site, signing_key))
    client = build_bot(frontend)
    state = client._connection
    state.user = discord.ClientUser(
        state=state,
        data={"id": "42", "username": "studio", "discriminator": "0", "avatar": None, "bot": True},
    )
    link = "https://media.example.org/p.png"  # not an allowed host: answered without a download
    payload = {
        "id": "7007",
        "application_id": "1001",
        "type": 2,
        "token": "token-7",
        "version": 1,
        "channel_id": "3003",
        "channel": {
            "id": "3003",
            "type": 0,
            "guild_id": "9",
            "name": "event",
            "position": 0,
            "permissions": "0",
            "flags": 0,
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
        },
        "guild_id": "9",
        "attachment_size_limit": 25 * 2**20,
        "locale": "en-US",
        "app_permissions": "0",
        "entitlements": [],
        "authorizing_integration_owners": {},
        "member": {
            "user": {"id": "555", "username": "player", "discriminator": "0", "avatar": None},
            "roles": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
        },
        "data": {
            "id": "1",
            "name": "draw",
            "type": 1,
            "options": [
                {"name": "photo", "type": 11, "value": "8008"},
                {"name": "prompt", "type": 3, "value": "a knight"},
            ],
            "resolved": {
                "attachments": {
                    "8008": {"id": "8008", "filename": "p.png", "size": 100, "url": link, "proxy_url": link}
                }
            },
        },
    }
    responses: list[tuple[Any, ...]] = []

    class Adapter:  # discord.py's HTTP adapter for interaction responses, without the network
        async def create_interaction_response(self, interaction_id: int, token: str, **kwargs: Any) -> Any:
            responses.append((interaction_id, token, kwargs["params"].payload))
            return {"interaction": {"id": str(interaction_id), "type": 2}}

    async def dispatch() -> None:
        async_context.set(Adapter())
        interaction = discord.Interaction(data=payload, state=state)
        await client.tree._call(interaction)

    asyncio.run(dispatch())
    assert responses == [(7007, "token-7", {"type": 5})]  # deferred first, through discord.py
    # then the shared handler: the stand-in Discord API gets the short refusal for the odd host
    path = "/webhooks/1001/token-7/messages/@original"
    edited = discord_site.wait_for(lambda s: s.method == "PATCH" and s.path == path)
    assert "not from Discord" in edited[-1].content()
    recorded = frontend.store.get("7007")
    assert recorded is not None and recorded.user_id == "555" and recorded.channel_id == "3003"
    frontend.stop()


def test_bot_register_and_settings_from_a_file(tmp_path: Path, discord_site: StandIn, capsys) -> None:
    from app.cli import main

    settings = StudioSettings(data_dir=tmp_path / "data", presets_dir=tmp_path / "presets")
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "discord.json").write_text(
        json.dumps(
            {
                "DISCORD_APPLICATION_ID": "app-1",
                "DISCORD_BOT_TOKEN": "bot-secret-token",
                "DISCORD_API_BASE": discord_site.url,
                "channel_presets": {"chan-9": "photo-to-game-character"},
            }
        ),
        encoding="utf-8",
    )
    assert main(["bot", "register", "--guild", "guild-5"], settings) == 0
    put = discord_site.wait_for(lambda s: s.method == "PUT")[0]
    assert put.path == "/applications/app-1/guilds/guild-5/commands"
    assert put.headers["Authorization"] == "Bot bot-secret-token"
    assert [c["name"] for c in put.json()] == ["draw"]
    assert "registered /draw" in capsys.readouterr().out

    config = load_discord_config(settings.data_dir, environ={"SDSTUDIO_DISCORD_DAILY_QUOTA": "7"})
    assert config.daily_quota == 7 and config.preset_for("chan-9", None) == "photo-to-game-character"
    assert config.preset_for("chan-1", None) == "default" and config.preset_for("chan-9", "mine") == "mine"
    assert "bot-secret-token" not in repr(config) and "bot-secret-token" not in str(config.model_dump())
    assert config.attachment_allowed("https://cdn.discordapp.com/attachments/1/2/p.png")
    assert not config.attachment_allowed("http://cdn.discordapp.com/attachments/1/2/p.png")
    assert not config.attachment_allowed("https://cdn.discordapp.com.evil.example/p.png")
    assert not config.attachment_allowed("https://192.168.1.10/p.png")


def test_the_route_and_the_gateway_bot_share_one_front_end(
    idle_services, discord_site: StandIn, signing_key: SigningKey
) -> None:
    """``launch.py bot`` serves the API beside the bot: both must use one front end, or the requests
    a restart left would be taken up, and answered, twice."""
    from app.discord.frontend import shared_frontend

    config = config_for(discord_site, signing_key)
    bot_side = shared_frontend(idle_services, config)
    router = discord_router(idle_services, config=config)
    assert router.state_frontend is bot_side  # type: ignore[attr-defined]
    assert shared_frontend(idle_services, config) is bot_side
    bot_side.stop()
