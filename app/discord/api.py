"""The few calls the studio makes to Discord's HTTP API, and the attachment download.

* edit a deferred response (``PATCH /webhooks/{application_id}/{token}/messages/@original``) with
  a text and, at the end, the picture as a multipart file;
* post in a channel with the bot token (after the 15 minutes an interaction token lasts);
* register the slash commands;
* fetch a user's attachment, from the allowed CDN hosts only, without following redirects, and no
  more bytes than the size cap.

429 answers are honoured: the call waits ``retry_after`` and tries again (progress edits instead
report the wait to their caller, which skips edits until then). URLs hold the interaction token,
so no error message here ever quotes a URL.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from app.discord.config import DiscordConfig

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_SECONDS = 60.0
MAX_TRIES = 5
TIMEOUT_SECONDS = 20.0
USER_AGENT = "DiscordBot (https://github.com/sd-studio, 1.0) SD-Studio"


class DiscordHttpError(Exception):
    """A call to Discord failed (status 0: no answer). The message never holds a URL or token."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class AttachmentError(Exception):
    """The attachment cannot be used; the message is short and meant for the channel."""


@dataclass(frozen=True)
class Picture:
    data: bytes
    filename: str


DRAW_COMMAND: dict[str, Any] = {
    "name": "draw",
    "type": 1,
    "description": "Redraw your photo in the event's style",
    "options": [
        {
            "type": 11,
            "name": "photo",
            "description": "Your photo (JPEG, PNG, WebP or HEIC)",
            "required": True,
        },
        {
            "type": 3,
            "name": "prompt",
            "description": "A few words: what to draw",
            "required": True,
            "max_length": 300,
        },
        {
            "type": 3,
            "name": "preset",
            "description": "Style preset (default: this channel's)",
            "required": False,
        },
    ],
}


class DiscordApi:
    def __init__(
        self,
        config: DiscordConfig,
        *,
        wait: Callable[[float], Any] | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.config = config
        self._stop = threading.Event()
        self.wait = wait or self._stop.wait
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def close(self) -> None:
        self._stop.set()
        self.session.close()

    # messages ----------------------------------------------------------------------------------
    def edit_original(
        self,
        application_id: str,
        token: str,
        content: str,
        *,
        picture: Picture | None = None,
        patient: bool = True,
    ) -> None:
        url = f"{self.config.api_base}/webhooks/{application_id}/{token}/messages/@original"
        self._send("PATCH", url, content, picture, headers={}, patient=patient)

    def post_in_channel(self, channel_id: str, content: str, *, picture: Picture | None = None) -> None:
        token = self.config.bot_token_value()
        if not token:
            raise DiscordHttpError(0, "no DISCORD_BOT_TOKEN: cannot post in the channel")
        url = f"{self.config.api_base}/channels/{channel_id}/messages"
        self._send("POST", url, content, picture, headers={"Authorization": f"Bot {token}"}, patient=True)

    def register_commands(self, application_id: str, guild_id: str | None = None) -> list[Any]:
        """Create (or replace) the /draw command, for one server (instant) or everywhere."""
        token = self.config.bot_token_value()
        if not token:
            raise DiscordHttpError(0, "DISCORD_BOT_TOKEN is needed to register commands")
        path = f"/applications/{application_id}" + (f"/guilds/{guild_id}" if guild_id else "") + "/commands"
        response = self._request(
            "PUT",
            self.config.api_base + path,
            headers={"Authorization": f"Bot {token}"},
            json=[DRAW_COMMAND],
            patient=True,
        )
        return list(response.json())

    def _send(
        self,
        method: str,
        url: str,
        content: str,
        picture: Picture | None,
        *,
        headers: dict[str, str],
        patient: bool,
    ) -> None:
        payload: dict[str, Any] = {"content": content[:2000], "allowed_mentions": {"parse": ["users"]}}
        if picture is None:
            self._request(method, url, headers=headers, json=payload, patient=patient)
            return
        payload["attachments"] = [{"id": 0, "filename": picture.filename}]
        self._request(
            method,
            url,
            headers=headers,
            data={"payload_json": json.dumps(payload)},
            files={"files[0]": (picture.filename, picture.data, "image/png")},
            patient=patient,
        )

    def _request(self, method: str, url: str, *, patient: bool, **kwargs: Any) -> requests.Response:
        for _ in range(MAX_TRIES):
            try:
                response = self.session.request(method, url, timeout=TIMEOUT_SECONDS, **kwargs)
            except requests.RequestException as exc:
                raise DiscordHttpError(0, f"Discord did not answer ({exc.__class__.__name__})") from None
            if response.status_code == 429:
                retry_after = _retry_after(response)
                if not patient:
                    raise DiscordHttpError(429, "rate limited", retry_after)
                log.info("Discord asked to wait %.2fs (429)", retry_after)
                self.wait(retry_after)
                continue
            if response.status_code >= 400:
                raise DiscordHttpError(response.status_code, f"Discord answered {response.status_code}")
            return response
        raise DiscordHttpError(429, "still rate limited after several tries")

    # attachments -------------------------------------------------------------------------------
    def fetch_attachment(self, url: str, max_bytes: int) -> bytes:
        """The attachment's bytes; refused (before any request) on a host outside the allow-list."""
        if not self.config.attachment_allowed(url):
            raise AttachmentError("That attachment link is not from Discord; attach the photo itself.")
        too_large = f"The photo is larger than {max_bytes / 2**20:g} MB."
        try:
            with self.session.get(
                url, stream=True, timeout=TIMEOUT_SECONDS, allow_redirects=False
            ) as response:
                if response.status_code != 200:
                    raise AttachmentError(f"The photo could not be downloaded ({response.status_code}).")
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise AttachmentError(too_large)
                chunks: list[bytes] = []
                total = 0
                for chunk in response.iter_content(64 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise AttachmentError(too_large)
                    chunks.append(chunk)
        except requests.RequestException as exc:
            raise AttachmentError(f"The photo could not be downloaded ({exc.__class__.__name__}).") from None
        return b"".join(chunks)


def _retry_after(response: requests.Response) -> float:
    seconds: float | None = None
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("retry_after") is not None:
            seconds = float(body["retry_after"])
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            seconds = float(response.headers.get("Retry-After", "1"))
        except ValueError:
            seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
