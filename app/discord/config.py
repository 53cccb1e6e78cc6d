"""Discord settings: from the environment, else ``data/discord.json``; secrets are never shown.

``DISCORD_APPLICATION_ID``, ``DISCORD_PUBLIC_KEY`` and ``DISCORD_BOT_TOKEN`` are Discord's names;
``DISCORD_API_BASE`` (default Discord's v10 API) and ``SDSTUDIO_DISCORD_ATTACHMENT_HOSTS`` (default
Discord's CDN hosts) let tests point the studio at local stand-ins. The same keys may be written in
``data/discord.json`` (the environment wins), with the event's policy: the channel -> preset map,
the per-user rate limit and daily quota, and the attachment size cap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from pipelines.errors import StudioError

DEFAULT_API_BASE = "https://discord.com/api/v10"
DEFAULT_ATTACHMENT_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
CONFIG_FILE_NAME = "discord.json"
INTERACTION_TOKEN_SECONDS = 15 * 60

_ENV_KEYS = {
    "DISCORD_APPLICATION_ID": "application_id",
    "DISCORD_PUBLIC_KEY": "public_key",
    "DISCORD_BOT_TOKEN": "bot_token",
    "DISCORD_API_BASE": "api_base",
    "SDSTUDIO_DISCORD_ATTACHMENT_HOSTS": "attachment_hosts",
    "SDSTUDIO_DISCORD_CHANNEL_PRESETS": "channel_presets",
    "SDSTUDIO_DISCORD_DEFAULT_PRESET": "default_preset",
    "SDSTUDIO_DISCORD_RATE_LIMIT": "rate_limit",
    "SDSTUDIO_DISCORD_RATE_WINDOW_SECONDS": "rate_window_seconds",
    "SDSTUDIO_DISCORD_DAILY_QUOTA": "daily_quota",
    "SDSTUDIO_DISCORD_MAX_ATTACHMENT_MB": "max_attachment_mb",
    "SDSTUDIO_DISCORD_PROGRESS_SECONDS": "progress_every_seconds",
}


class DiscordConfigError(StudioError):
    """The Discord settings are missing or unusable (the message names the setting)."""


class DiscordConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    application_id: str | None = None
    public_key: str | None = Field(None, description="The application's Ed25519 public key (hex).")
    bot_token: SecretStr | None = None
    api_base: str = DEFAULT_API_BASE
    attachment_hosts: tuple[str, ...] = DEFAULT_ATTACHMENT_HOSTS
    channel_presets: dict[str, str] = Field(default_factory=dict, description="channel id -> preset name")
    default_preset: str = "default"
    rate_limit: int = Field(3, ge=1, le=1000, description="/draw commands per user per rate window.")
    rate_window_seconds: float = Field(60.0, gt=0, le=86_400)
    daily_quota: int = Field(20, ge=0, le=100_000, description="Pictures per user per day (UTC); 0 = none.")
    max_attachment_mb: float = Field(8.0, gt=0, le=100)
    progress_every_seconds: float = Field(
        3.0, ge=0, le=600, description="At most one progress edit this often."
    )
    signature_max_age_seconds: float = Field(300.0, gt=0, le=3600)
    token_lifetime_seconds: float = Field(INTERACTION_TOKEN_SECONDS, gt=0)

    @field_validator("attachment_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("channel_presets", mode="before")
    @classmethod
    def _channel_map(cls, value: Any) -> Any:
        """``{"123": "preset"}`` or, from the environment, JSON or ``123=preset,456=other``."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = (item.partition("=") for item in text.split(",") if item.strip())
            return {channel.strip(): preset.strip() for channel, _, preset in pairs}
        return value

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value.rstrip("/")

    @property
    def max_attachment_bytes(self) -> int:
        return int(self.max_attachment_mb * 2**20)

    def bot_token_value(self) -> str | None:
        return self.bot_token.get_secret_value() if self.bot_token else None

    def preset_for(self, channel_id: str | None, asked: str | None) -> str:
        """The preset a /draw uses: the one asked for, else the channel's, else ``default_preset``."""
        if asked and asked.strip():
            return asked.strip()
        if channel_id and channel_id in self.channel_presets:
            return self.channel_presets[channel_id]
        return self.default_preset

    def attachment_allowed(self, url: str) -> bool:
        """Only https URLs on the allowed hosts (an entry written ``http://host:port`` allows plain
        http on that port: the tests' stand-in CDN). No other host is ever contacted."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        host = (parts.hostname or "").lower()
        if not host or parts.username or parts.password:
            return False
        for entry in self.attachment_hosts:
            allowed = urlsplit(entry if "://" in entry else f"https://{entry}")
            try:
                allowed_port = allowed.port
            except ValueError:
                continue
            if (
                parts.scheme == allowed.scheme
                and host == (allowed.hostname or "").lower()
                and (port or None) == (allowed_port or None)
            ):
                return True
        return False


def load_discord_config(data_dir: Path, environ: Mapping[str, str] | None = None) -> DiscordConfig:
    """``data/discord.json`` overlaid by the environment (either may use the env names or ours)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = Path(data_dir) / CONFIG_FILE_NAME
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DiscordConfigError(
                f"{path} is not valid JSON ({exc.__class__.__name__}); fix or remove it."
            ) from exc
        if not isinstance(loaded, dict):
            raise DiscordConfigError(f"{path} must hold a JSON object of settings.")
        for key, value in loaded.items():
            values[_ENV_KEYS.get(key, key)] = value
    for env_name, field in _ENV_KEYS.items():
        if environ.get(env_name):
            values[field] = environ[env_name]
    try:
        return DiscordConfig.model_validate(values)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in error["loc"]) for error in exc.errors())
        raise DiscordConfigError(
            f"Discord settings ({path} or the environment) are invalid: {fields}. Check those values."
        ) from None
