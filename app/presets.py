"""Presets: named job templates that turn "a photo and a few words" into a full job.

A preset is one readable YAML file in ``presets/`` (``settings.presets_dir``)::

    name: photo-to-game-character
    mode: img2img                 # or txt2img
    longest_side: 512             # the photo's longest side is fitted to this (multiples of 8)
    blocked_words: [gore, nude]   # prompt words refused (public events)
    safety_checker: false         # the SD safety checker, when models/safety_checker has its files
    request:                      # the body of /sdapi/v1/img2img (or txt2img); A1111 field names
      prompt: "game character, {prompt}, cel shading <lora:game-style:0.8>"
      negative_prompt: "photo, blurry"
      ...

The ``request`` is validated with the studio's own request models (``contract/images.py``), so a
preset can hold anything a job can: model, VAE, LoRAs, sampler and schedule, steps, CFG, img2img
denoising, ControlNet units (a unit without an image gets the photo, and canny when it names no
``module``), face restore, hires fix.
A run fills in the user's words (``{prompt}``), the photo (EXIF orientation applied, resized so its
longest side is ``longest_side``, both sides multiples of 8) and the seed: the result is an ordinary
request, the same one a client could have sent in full, so a preset run equals that request image
for image. Presets are checked when saved and again when run: a model that has since been removed
is an error naming the preset's file.
"""

from __future__ import annotations

import base64
import io
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from contract.images import Img2ImgRequest, Txt2ImgRequest, format_validation_error
from pipelines.errors import ModelNotFoundError, StudioError

if TYPE_CHECKING:
    from PIL import Image

    from app.services import StudioServices
    from pipelines.models.registry import ModelRegistry

PROMPT_SLOT = "{prompt}"
PRESET_SUFFIX = ".yaml"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_PROMPT_CHARS = 500
MAX_PHOTO_PIXELS = 64_000_000
"""A 48-megapixel phone photo fits; a decompression bomb does not."""
PHOTO_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "HEIF": "HEIC"}
"""Formats a preset run accepts (Pillow's names -> what users call them). MPO is how Pillow reads
many phones' JPEGs (a JPEG with a second, depth or preview, picture)."""
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
_VAE_BUILTINS = {"", "automatic", "none", "auto"}
_PLACEHOLDER_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAADElEQVR4nGNgGB4AAADIAAGtQHYiAAAAAElFTkSuQmCC"
)
"""An 8x8 PNG standing in for the photo while a preset is validated (img2img needs an image)."""
_IMAGE_FIELDS = ("init_images", "mask")
DEFAULT_PHOTO_MODULE = "canny"


class PresetError(StudioError):
    """A preset cannot be saved or run as it is; the message names the preset (and its file)."""


class PresetNotFoundError(PresetError, ModelNotFoundError):
    """No preset of that name in ``presets/``."""


class PresetModelMissingError(PresetError, ModelNotFoundError):
    """The preset names a model that is not in ``models/`` (any more)."""


class PhotoError(PresetError):
    """The photo is missing, too large, or not an image of a format we read."""


class PromptRefusedError(PresetError):
    """The words contain one the preset's ``blocked_words`` refuses."""


class Preset(BaseModel):
    """One preset file. ``request`` is an A1111 request body whose prompt holds ``{prompt}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="File name without .yaml: lower-case letters, digits, - and _.")
    description: str = Field("", max_length=500)
    mode: Literal["txt2img", "img2img"] = "img2img"
    longest_side: int = Field(512, ge=64, le=2048, description="The photo's longest side is fitted to this.")
    blocked_words: list[str] = Field(default_factory=list, description="Words (or phrases) refused.")
    safety_checker: bool = Field(False, description="Hold back images the SD safety checker flags.")
    request: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"'{value}' is not a preset name: use 1-64 lower-case letters, digits, '-' or '_' "
                "(e.g. photo-to-game-character)"
            )
        return value

    @field_validator("blocked_words")
    @classmethod
    def _clean_words(cls, value: list[str]) -> list[str]:
        return [word.strip().lower() for word in value if word.strip()]

    @property
    def needs_photo(self) -> bool:
        """img2img always; txt2img when a ControlNet unit has no image of its own."""
        if self.mode == "img2img":
            return True
        return any(
            isinstance(unit, dict) and unit.get("enabled", True) and not unit.get("image")
            for unit in _units(self.request)
        )

    def to_yaml(self) -> str:
        import yaml

        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def _units(request: dict[str, Any]) -> list[Any]:
    units = request.get("controlnet_units")
    if units:
        return list(units)
    for name, value in (request.get("alwayson_scripts") or {}).items():
        if str(name).lower() == "controlnet" and isinstance(value, dict):
            return list(value.get("args") or [])
    return []


def request_model(mode: str) -> type[Txt2ImgRequest] | type[Img2ImgRequest]:
    return Img2ImgRequest if mode == "img2img" else Txt2ImgRequest


def preset_from_request(
    name: str,
    mode: Literal["txt2img", "img2img"],
    request: dict[str, Any],
    **options: Any,
) -> Preset:
    """A preset from a request body (the API's ``POST /studio/v1/presets``, the UI's "Save as
    preset"). Images (the photo the settings were tried on, control images) and the seed are left
    out: each run brings its own photo and seed."""
    body = {k: v for k, v in dict(request).items() if k not in _IMAGE_FIELDS and k not in ("seed", "mode")}
    units = _units(body)
    if units:
        body.pop("alwayson_scripts", None)
        body["controlnet_units"] = [
            {k: v for k, v in unit.items() if k not in ("image", "input_image")}
            for unit in units
            if isinstance(unit, dict)
        ]
    return Preset(name=name, mode=mode, request=body, **options)


class PresetStore:
    """The ``presets/`` folder: list, read, validate and save preset files (thread-safe)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()

    @classmethod
    def for_services(cls, services: StudioServices) -> PresetStore:
        return cls(services.settings.presets_dir)

    def path_for(self, name: str) -> Path:
        if not NAME_PATTERN.match(name or ""):
            raise PresetNotFoundError(f"'{name}' is not a preset name (see GET /studio/v1/presets).")
        return self.folder / f"{name}{PRESET_SUFFIX}"

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(
            p.stem
            for p in self.folder.glob(f"*{PRESET_SUFFIX}")
            if p.is_file() and NAME_PATTERN.match(p.stem)
        )

    def load(self, name: str) -> Preset:
        """The preset file parsed and checked for shape (not yet for models: see :func:`check_preset`)."""
        path = self.path_for(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none yet"
            raise PresetNotFoundError(f"No preset named '{name}' in {self.folder} (presets: {known}).")
        return read_preset_file(path)

    def save(
        self, preset: Preset, registry: ModelRegistry | None, *, models_root: Path | None = None
    ) -> Path:
        """Validate (request fields, ``{prompt}``, models present) and write the file atomically."""
        path = self.path_for(preset.name)
        check_preset(preset, registry, source=path, models_root=models_root)
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            temp = path.with_suffix(".yaml.tmp")
            temp.write_text(preset.to_yaml(), encoding="utf-8")
            os.replace(temp, path)
        return path

    def delete(self, name: str) -> bool:
        path = self.path_for(name)
        with self._lock:
            if path.is_file():
                path.unlink()
                return True
        return False


def read_preset_file(path: Path) -> Preset:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"Preset file {path} cannot be read ({exc}).") from exc
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise PresetError(
            f"Preset file {path} is not valid YAML ({first_line}). Fix the file or save the preset again."
        ) from exc
    if not isinstance(data, dict):
        raise PresetError(f"Preset file {path} must hold a mapping (name:, mode:, request: ...).")
    data.setdefault("name", path.stem)
    try:
        preset = Preset.model_validate(data)
    except ValidationError as exc:
        raise PresetError(f"Preset file {path}: {format_validation_error(exc)}") from exc
    if preset.name != path.stem:
        raise PresetError(
            f"Preset file {path} says name: {preset.name}; the name must be the file's ({path.stem})."
        )
    return preset


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_preset(
    preset: Preset, registry: ModelRegistry | None, *, source: Path | str, models_root: Path | None = None
) -> Txt2ImgRequest | Img2ImgRequest:
    """Check a preset as a run would use it; errors name ``source`` (its file). Returns the request
    with a sample prompt and a placeholder photo."""
    prompt = str(preset.request.get("prompt", ""))
    if PROMPT_SLOT not in prompt:
        raise PresetError(
            f"Preset {source}: request.prompt must hold {PROMPT_SLOT} where the user's words go "
            f"(e.g. 'game character, {PROMPT_SLOT}, cel shading')."
        )
    request = _validated(preset, source, _fill(preset, "sample words", _PLACEHOLDER_IMAGE, (64, 64), -1))
    if registry is not None:
        check_models(preset, request, registry, source=source)
    if preset.safety_checker and models_root is not None:
        from app.safety_checker import require_safety_checker

        try:
            require_safety_checker(models_root)
        except StudioError as exc:
            raise PresetError(f"Preset {source}: safety_checker is on, but {exc}") from exc
    return request


def _validated(preset: Preset, source: Path | str, body: dict[str, Any]) -> Txt2ImgRequest | Img2ImgRequest:
    try:
        return request_model(preset.mode).model_validate(body)
    except ValidationError as exc:
        lines = format_validation_error(exc).replace("\n", "; ")
        raise PresetError(f"Preset {source}: request.{lines}") from exc


def check_models(
    preset: Preset, request: Txt2ImgRequest | Img2ImgRequest, registry: ModelRegistry, *, source: Path | str
) -> None:
    """Every model the preset names is in ``models/`` (rescanning each folder once before giving up)."""
    wanted: list[tuple[str, str, str]] = []  # (registry kind, name, where in the preset)
    if request.checkpoint:
        wanted.append(("checkpoint", request.checkpoint, "request.override_settings.sd_model_checkpoint"))
    if request.vae and request.vae.strip().lower() not in _VAE_BUILTINS:
        wanted.append(("vae", request.vae, "request.override_settings.sd_vae"))
    for field in ("prompt", "negative_prompt"):
        for lora in _LORA_TAG.findall(str(preset.request.get(field, ""))):
            wanted.append(("lora", lora.strip(), f"request.{field} (<lora:{lora}>)"))
    for kind, name, where in wanted:
        try:
            if not registry.find(kind, name).path.exists():  # type: ignore[arg-type]
                raise ModelNotFoundError(name)  # listed before it was deleted
        except ModelNotFoundError:
            registry.refresh(kind)  # type: ignore[arg-type]
            try:
                registry.find(kind, name)  # type: ignore[arg-type]
            except ModelNotFoundError:
                folder = registry.paths.folder(kind)  # type: ignore[arg-type]
                raise PresetModelMissingError(
                    f"Preset {source} names {kind} '{name}' ({where}), which is not in {folder}. Put the "
                    "file back, or edit the preset to name a model you have."
                ) from None
    controlnet_dir = registry.paths.folder("controlnet")
    for index, unit in enumerate(request.controlnet_units):
        if not unit.enabled or not unit.uses_model:
            continue
        from pipelines.controlnet.model_files import find_controlnet

        try:
            find_controlnet(controlnet_dir, unit.model)
        except (StudioError, ValueError, FileNotFoundError):
            raise PresetModelMissingError(
                f"Preset {source} names ControlNet model '{unit.model}' (request.controlnet_units.{index}."
                f"model), which is not in {controlnet_dir}. Put the file back, or edit the preset."
            ) from None


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def fit_longest_side(width: int, height: int, longest: int) -> tuple[int, int]:
    """The size whose longest side is ``longest`` with the photo's aspect, both multiples of 8."""
    scale = longest / max(width, height)

    def side(value: int) -> int:
        return max(64, round(value * scale / 8) * 8)

    return side(width), side(height)


def register_heif() -> None:
    """Let Pillow open HEIC/HEIF (iPhone photos) through pillow-heif (idempotent)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # pragma: no cover - pillow-heif is in requirements.txt
        return
    register_heif_opener()


def decode_photo(data: bytes, *, max_bytes: int, field: str = "photo") -> Image.Image:
    """The photo as an upright RGB image: checked by decoding (not by its name), EXIF orientation
    applied. JPEG, PNG, WebP and HEIC up to ``max_bytes``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from pipelines.generation.image_ops import to_rgb

    if not data:
        raise PhotoError(f"{field}: no image was sent.")
    if len(data) > max_bytes:
        raise PhotoError(
            f"{field}: the photo is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:g} MB."
        )
    register_heif()
    try:
        image = Image.open(io.BytesIO(data))
        kind = PHOTO_FORMATS.get(str(image.format))
        if kind is None:
            raise PhotoError(
                f"{field}: {image.format} images are not accepted; send a JPEG, PNG, WebP or HEIC photo."
            )
        if image.width * image.height > MAX_PHOTO_PIXELS:
            raise PhotoError(f"{field}: {image.width}x{image.height} is too many pixels for a photo.")
        image.load()
        upright = ImageOps.exif_transpose(image)
    except PhotoError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PhotoError(
            f"{field}: not a readable image ({exc.__class__.__name__}); send a JPEG, PNG, WebP or HEIC photo."
        ) from exc
    return to_rgb(upright)


def prepare_photo(data: bytes, longest_side: int, *, max_bytes: int) -> tuple[str, int, int]:
    """The photo as base64 PNG fitted to ``longest_side``, and its width and height."""
    from PIL import Image

    photo = decode_photo(data, max_bytes=max_bytes)
    width, height = fit_longest_side(photo.width, photo.height, longest_side)
    resized = photo.resize((width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), width, height


def check_words(preset: Preset, words: str) -> str:
    """The user's words, trimmed, if the preset's filter allows them."""
    text = " ".join(str(words or "").split())
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptRefusedError(
            f"The prompt is too long ({len(text)} characters; at most {MAX_PROMPT_CHARS})."
        )
    lowered = text.lower()
    for word in preset.blocked_words:
        if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lowered):
            raise PromptRefusedError(f"The word '{word}' is not allowed with the preset '{preset.name}'.")
    return text


def _fill(
    preset: Preset, words: str, photo: str | None, size: tuple[int, int] | None, seed: int
) -> dict[str, Any]:
    body = dict(preset.request)
    body["mode"] = preset.mode
    body["prompt"] = str(body.get("prompt", "")).replace(PROMPT_SLOT, words)
    body["seed"] = seed
    if size is not None:
        body["width"], body["height"] = size
    units = _units(body)
    if units:
        body.pop("alwayson_scripts", None)
        body["controlnet_units"] = [_photo_unit(unit, photo) for unit in units]
    if preset.mode == "img2img":
        body["init_images"] = [photo] if photo else []
        body.setdefault("resize_mode", 0)
    return body


def _photo_unit(unit: Any, photo: str | None) -> Any:
    """A unit without an image of its own gets the photo; without a ``module`` it gets canny, the
    annotator that suits a photo (its edges keep the pose and outline) and needs no model files."""
    if not isinstance(unit, dict) or unit.get("image"):
        return unit
    filled = {"module": DEFAULT_PHOTO_MODULE, **unit}
    if photo:
        filled["image"] = photo
    return filled


def build_preset_request(
    preset: Preset,
    words: str,
    photo: bytes | None,
    *,
    seed: int | None = None,
    max_photo_bytes: int = 20 * 2**20,
    default_checkpoint: str | None = None,
    source: Path | str | None = None,
) -> Txt2ImgRequest | Img2ImgRequest:
    """The full request a preset run submits (prompt filled in, photo fitted, seed set)."""
    where = source or f"'{preset.name}'"
    text = check_words(preset, words)
    encoded: str | None = None
    size: tuple[int, int] | None = None
    if photo:
        encoded, width, height = prepare_photo(photo, preset.longest_side, max_bytes=max_photo_bytes)
        size = (width, height)
    elif preset.needs_photo:
        raise PhotoError(f"The preset '{preset.name}' needs a photo: attach one (JPEG, PNG, WebP or HEIC).")
    body = _fill(preset, text, encoded, size, -1 if seed is None else int(seed))
    if default_checkpoint and not (body.get("override_settings") or {}).get("sd_model_checkpoint"):
        body["override_settings"] = {
            **(body.get("override_settings") or {}),
            "sd_model_checkpoint": default_checkpoint,
        }
    return _validated(preset, where, body)


def preset_request_for(
    services: StudioServices,
    store: PresetStore,
    name: str,
    words: str,
    photo: bytes | None,
    *,
    seed: int | None = None,
) -> tuple[Preset, Txt2ImgRequest | Img2ImgRequest]:
    """Load and re-check the preset (its models may have gone since it was saved), then build the
    request a run submits."""
    preset = store.load(name)
    path = store.path_for(name)
    check_preset(preset, services.registry, source=path, models_root=services.settings.models_dir)
    request = build_preset_request(
        preset,
        words,
        photo,
        seed=seed,
        max_photo_bytes=int(services.settings.max_photo_mb * 2**20),
        default_checkpoint=services.selected_checkpoint,
        source=path,
    )
    if preset.safety_checker:  # screened in the worker, before any image leaves it
        from app.safety_checker import SAFETY_KEY

        overrides = {**(request.override_settings or {}), SAFETY_KEY: True}
        request = request.model_copy(update={"override_settings": overrides})
    return preset, request


def submit_preset_job(
    services: StudioServices,
    store: PresetStore,
    name: str,
    words: str,
    photo: bytes | None,
    *,
    owner: str,
    seed: int | None = None,
) -> tuple[Preset, str]:
    """Queue a preset run for ``owner``; the job id. A checked preset's images are screened in the
    worker (``preset_request_for`` asks for it), before they reach ``outputs/``."""
    preset, request = preset_request_for(services, store, name, words, photo, seed=seed)
    job_id = services.queue.submit(request, owner=owner)  # whoever serves started the queue
    return preset, job_id


def describe_preset(preset: Preset, store: PresetStore, registry: ModelRegistry | None) -> dict[str, Any]:
    """What ``GET /studio/v1/presets`` and the UI list: the preset and whether it can run now."""
    error: str | None = None
    try:
        check_preset(preset, registry, source=store.path_for(preset.name))
    except StudioError as exc:
        error = str(exc)
    return {
        "name": preset.name,
        "description": preset.description,
        "mode": preset.mode,
        "longest_side": preset.longest_side,
        "needs_photo": preset.needs_photo,
        "safety_checker": preset.safety_checker,
        "blocked_words": len(preset.blocked_words),
        "request": preset.request,
        "ready": error is None,
        "error": error,
    }


def list_presets(store: PresetStore, registry: ModelRegistry | None) -> list[dict[str, Any]]:
    """Every preset file; one that cannot be read is listed with its error rather than hidden."""
    items = []
    for name in store.names():
        try:
            items.append(describe_preset(store.load(name), store, registry))
        except StudioError as exc:
            items.append({"name": name, "ready": False, "error": str(exc)})
    return items
