"""Studio settings: one object, read from defaults, ``data/config.json``, ``SDSTUDIO_*`` env vars
and command-line flags (in rising priority), then passed to whatever needs it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

SECRET_FIELDS = ("auth", "api_auth")

MemoryPresetName = Literal["auto", "high", "medvram", "lowvram", "lowvram-sequential", "cpu"]


class StudioSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDSTUDIO_", extra="ignore", validate_assignment=True)

    data_dir: Path = Field(REPO_ROOT / "data", description="Job store, caches and config.json.")
    outputs_dir: Path = Field(REPO_ROOT / "outputs", description="Where every finished image is written.")
    models_dir: Path = Field(REPO_ROOT / "models", description="A1111-style model folders.")
    presets_dir: Path = Field(REPO_ROOT / "presets", description="Job presets, one YAML file each.")
    max_photo_mb: float = Field(
        20.0, gt=0, le=1024, description="Largest photo (JPEG, PNG, WebP, HEIC) a preset run accepts, in MB."
    )
    ckpt_dir: Path | None = None
    vae_dir: Path | None = None
    lora_dir: Path | None = None
    controlnet_dir: Path | None = None
    esrgan_dir: Path | None = None
    embeddings_dir: Path | None = None

    default_checkpoint: str | None = Field(None, description="Checkpoint loaded when a job names none.")
    checkpoints_in_ram: int = Field(
        2, ge=1, le=16, description="Loaded checkpoints kept for instant switching."
    )
    preload_model: bool = Field(
        False, description="Load the default model at startup instead of on first use."
    )
    max_queued_jobs: int = Field(100, ge=1, le=100_000, description="Waiting jobs beyond this are refused.")

    memory_preset: MemoryPresetName = "auto"
    no_half: bool = False
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    no_half_vae: bool = False
    attention: Literal["auto", "sdpa", "xformers", "slicing", "default"] = "auto"
    channels_last: bool = False
    compile: bool = False
    tf32: bool = True
    fp8_unet: bool = Field(
        False, description="Store UNet weights in float8 (layerwise casting): about half the VRAM of fp16."
    )
    # Per-job speed options: the studio's defaults, used when a job gives no value of its own.
    cache_interval: int = Field(
        1, ge=1, le=10, description="Step caching (DeepCache): full UNet every N steps; 1 = off."
    )
    token_merging_ratio: float = Field(
        0.0, ge=0.0, le=0.9, description="Token merging (ToMe): share of tokens merged; 0 = off."
    )
    fast_decode: bool = Field(False, description="Decode the final image with TAESD (drafts).")

    # Web UI defaults (Settings tab); read when a page loads, so a change needs no restart.
    default_sampler: str = Field("Euler a", description="Sampler the txt2img/img2img tabs start with.")
    default_scheduler: str = Field("Automatic", description="Schedule type the tabs start with.")
    live_preview: Literal["auto", "taesd", "cheap", "none"] = Field(
        "auto", description="Live preview: TAESD when its weights are in models/VAE-approx, else cheap."
    )
    live_preview_every: int = Field(1, ge=1, le=100, description="Refresh the live preview every N steps.")

    listen: bool = False
    port: int = Field(7860, ge=1, le=65535)
    share: bool = False
    auth: str | None = Field(None, description="user:pass[,user2:pass2] for the UI.")
    auth_file: Path | None = None
    api: bool = False
    nowebui: bool = False
    api_auth: str | None = Field(
        None, description="user:pass[,user2:pass2] for the REST API (HTTP Basic); defaults to --auth."
    )
    max_upload_mb: float = Field(
        50.0, gt=0, le=4096, description="Largest request body (uploads, base64 images) accepted, in MB."
    )
    max_pixels: int | None = Field(
        None,
        gt=0,
        description="Memory budget: most pixels an output or intermediate image may have (default: "
        "derived from RAM and GPU memory; see contract/budget.py). Env: SDSTUDIO_MAX_PIXELS.",
    )
    share_outputs: bool = Field(
        False,
        description="With auth on, let every user fetch every output file (default: only the user "
        "whose job made it).",
    )
    device_ids: list[str] | None = Field(
        None,
        description="Devices to run jobs on, one worker each (cuda:0, cuda:1, cpu...); default: every "
        "CUDA GPU, else one CPU or MPS worker.",
    )
    in_process_workers: bool = Field(
        False, description="Run jobs in threads of the studio process instead of worker processes."
    )
    max_job_attempts: int = Field(
        2, ge=1, le=10, description="A job whose run stopped its worker (or the studio) this often fails."
    )
    worker_torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch threads per worker process (default: torch's own choice)."
    )
    cluster_address: str | None = Field(
        None,
        description="Run jobs on the workers of this Ray cluster (host:port of its head) instead of local "
        "worker processes; set by --cluster-head, or given to use a cluster started by hand.",
    )
    cluster_shared_models: bool = Field(
        False,
        description="Every cluster node reads the models folder these settings name (one shared copy for "
        "the studio), instead of its own models/ folder.",
    )
    gpu_share: int = Field(1, ge=1, le=8, description="Workers per GPU on cluster nodes (--gpu-share K).")
    talking_head_split_seconds: float = Field(
        8.0,
        ge=-1,
        le=3600,
        description="Talking heads with at least this many seconds of speech are rendered by several "
        "workers at once when more than one is ready (0: every one; -1: never).",
    )

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config.json"

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen else "127.0.0.1"

    def memory_overrides(self) -> dict[str, Any]:
        """The flag-level tweaks applied on top of the chosen memory preset."""
        overrides: dict[str, Any] = {}
        if self.precision != "auto":
            overrides["dtype"] = self.precision
        if self.no_half:
            overrides["dtype"] = "fp32"
        if self.no_half_vae:
            overrides["no_half_vae"] = True
        if self.attention != "auto":
            overrides["attention"] = self.attention
        if self.channels_last:
            overrides["channels_last"] = True
        if self.compile:
            overrides["compile"] = True
        if not self.tf32:
            overrides["tf32"] = False
        if self.fp8_unet:
            overrides["fp8_unet"] = True
        return overrides

    def speed_defaults(self) -> dict[str, Any]:
        """The per-job speed options a job gets when it sets none (``ImageEngine`` reads them)."""
        return {
            "cache_interval": self.cache_interval,
            "token_merging_ratio": self.token_merging_ratio,
            "fast_decode": self.fast_decode,
        }

    def save(self, only: Iterable[str] | None = None) -> None:
        """Persist the settings a user changed in the Settings tab (atomic write).

        ``only`` names the fields to write, merged into the existing file, so that command-line
        flags of this run (``--port``, ``--auth``...) do not become permanent by accident.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        data = self.model_dump(mode="json", exclude_defaults=True)
        if only is not None:
            names = set(only)
            current: dict[str, Any] = {}
            if self.config_file.is_file():
                try:
                    current = json.loads(self.config_file.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    current = {}
            chosen = self.model_dump(mode="json", include=names)
            data = {k: v for k, v in current.items() if k not in names}
            data.update(chosen)
        for secret in SECRET_FIELDS:  # passwords belong in --auth-file, never in config.json
            data.pop(secret, None)
        temp = self.config_file.with_suffix(".json.tmp")
        temp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(temp, self.config_file)


def load_settings(overrides: dict[str, Any] | None = None, *, data_dir: Path | None = None) -> StudioSettings:
    """Defaults < ``config.json`` < environment < ``overrides`` (command-line flags)."""
    base = StudioSettings()
    folder = data_dir or (overrides or {}).get("data_dir") or base.data_dir
    file_values: dict[str, Any] = {}
    config_file = Path(folder) / "config.json"
    if config_file.is_file():
        try:
            file_values = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            file_values = {}
    env_values = {k: v for k, v in base.model_dump().items() if k in base.model_fields_set}
    merged = {**file_values, **env_values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return StudioSettings(**merged)
