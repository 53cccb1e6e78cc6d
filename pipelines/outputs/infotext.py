"""AUTOMATIC1111 "parameters" text (infotext): write it, read it, turn it into request fields.

The format, as A1111 writes it into every PNG::

    <prompt, may span several lines>
    Negative prompt: <negative prompt, may span several lines>
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512

Reading follows A1111's ``parse_generation_parameters``: the last line holds the parameters only if
at least three ``key: value`` pairs are found in it (otherwise it is part of a prompt); every line
is stripped; a value is JSON-unquoted when it is wrapped in double quotes. One extension: a value
that starts with ``[`` or ``{`` and is valid JSON up to the next comma separator is kept whole
(Civitai writes ``Civitai resources: [{...}, {...}]`` unquoted), where A1111 would cut it at the
first comma.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = [
    "InfoText",
    "InfotextValueError",
    "build_infotext",
    "infotext_to_request_fields",
    "parse_infotext",
    "quote_value",
]

_NEGATIVE_PREFIX = "Negative prompt:"
# A1111's key rule: a word character, then at least one word character, space, '-' or '/'.
_KEY_RE = re.compile(r"\s*(\w[\w \-/]+):\s*")
_KEY_FULL_RE = re.compile(r"\w[\w \-/]+")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_JSON_DECODER = json.JSONDecoder()
_T = TypeVar("_T")


class InfotextValueError(ValueError):
    """A parameter in an infotext is present but cannot be read as the expected type."""


def quote_value(value: str) -> str:
    """Quote a value the way A1111's ``quote()`` does, plus the cases it misses.

    A1111 JSON-quotes values containing ``,``, ``:`` or a newline. We also quote values that
    contain ``"``, are empty, or have leading/trailing whitespace: unquoted, those would not read
    back as the same string.
    """
    if value == "" or value != value.strip() or any(ch in value for ch in ',:\n"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def _format_value(value: object) -> str:
    """Render a parameter value the way A1111 prints it (``7`` for 7.0, ``7.5`` for 7.5)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """Compose A1111's infotext. ``None`` values are left out; keys keep the order given.

    A1111 readers recognise the parameter line only when it has at least three entries, which
    every real generation has (Steps, Sampler, CFG scale, Seed, Size...).
    """
    parts: list[str] = []
    for key, value in params.items():
        if value is None:
            continue
        if not isinstance(key, str) or _KEY_FULL_RE.fullmatch(key) is None or key != key.rstrip():
            raise ValueError(
                f"infotext parameter name {key!r} cannot be written: A1111 names start with a letter "
                "or digit and contain only letters, digits, spaces, '-' and '/'."
            )
        parts.append(f"{key}: {quote_value(_format_value(value))}")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE_PREFIX} {negative_prompt}")
    if parts:
        lines.append(", ".join(parts))
    return "\n".join(lines)


def _read_value(text: str, start: int) -> tuple[str, int]:
    """Read one value at ``start``; return (value, index just past its trailing comma).

    Mirrors A1111's ``("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`` and adds whole JSON arrays/objects.
    """
    if start < len(text) and text[start] in '"[{':
        try:
            decoded, end = _JSON_DECODER.raw_decode(text, start)
        except ValueError:
            decoded, end = None, -1
        if end != -1 and (end == len(text) or text[end] == ","):
            raw = text[start:end]
            value = decoded if isinstance(decoded, str) else raw
            return value, end + 1
    comma = text.find(",", start)
    end = len(text) if comma == -1 else comma
    return text[start:end], end + 1


def _parse_params(line: str) -> list[tuple[str, str]]:
    """All ``key: value`` pairs in ``line``, scanning like ``re.findall`` does (skip on no match)."""
    pairs: list[tuple[str, str]] = []
    position = 0
    while position < len(line):
        match = _KEY_RE.match(line, position)
        if match is None:
            position += 1
            continue
        value, position = _read_value(line, match.end())
        pairs.append((match.group(1), value))
    return pairs


@dataclass(frozen=True)
class InfoText:
    """A parsed infotext. ``params`` keeps every ``key: value`` as text, in file order.

    The typed helpers return ``None`` when a key is absent and raise :class:`InfotextValueError`
    (naming the key) when it is present but malformed.
    """

    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, default)

    def get_int(self, key: str) -> int | None:
        raw = self.params.get(key)
        if raw is None:
            return None
        try:
            return int(raw.strip())
        except ValueError:
            try:
                number = float(raw.strip())
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
            raise InfotextValueError(f"infotext '{key}: {raw}' is not a whole number") from None

    def get_float(self, key: str) -> float | None:
        raw = self.params.get(key)
        if raw is None:
            return None
        try:
            return float(raw.strip())
        except ValueError:
            raise InfotextValueError(f"infotext '{key}: {raw}' is not a number") from None

    def get_size(self, key: str = "Size") -> tuple[int, int] | None:
        """``"512x768"`` -> ``(512, 768)`` (width, height)."""
        raw = self.params.get(key)
        if raw is None:
            return None
        match = _SIZE_RE.match(raw.strip())
        if match is None:
            raise InfotextValueError(f"infotext '{key}: {raw}' is not a size like 512x768")
        return int(match.group(1)), int(match.group(2))

    def get_hashes(self, key: str = "Lora hashes") -> dict[str, str]:
        """``"add_detail: 7c6bad76eb54, film: 1a2b"`` -> ``{"add_detail": "7c6bad76eb54", ...}``.

        Used for ``Lora hashes`` and ``TI hashes``; a JSON object value (``Hashes: {...}``) is
        read as JSON.
        """
        raw = self.params.get(key)
        if raw is None:
            return {}
        stripped = raw.strip()
        if stripped.startswith("{"):
            try:
                decoded = json.loads(stripped)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                return {str(name): str(value) for name, value in decoded.items()}
        hashes: dict[str, str] = {}
        for item in stripped.split(","):
            name, sep, digest = item.rpartition(":")
            if sep and name.strip():
                hashes[name.strip()] = digest.strip()
        return hashes

    @property
    def steps(self) -> int | None:
        return self.get_int("Steps")

    @property
    def sampler_name(self) -> str | None:
        return self.params.get("Sampler")

    @property
    def schedule_type(self) -> str | None:
        return self.params.get("Schedule type")

    @property
    def cfg_scale(self) -> float | None:
        return self.get_float("CFG scale")

    @property
    def seed(self) -> int | None:
        return self.get_int("Seed")

    @property
    def width(self) -> int | None:
        size = self.get_size("Size")
        return None if size is None else size[0]

    @property
    def height(self) -> int | None:
        size = self.get_size("Size")
        return None if size is None else size[1]

    @property
    def clip_skip(self) -> int:
        """A1111 leaves ``Clip skip`` out when it is 1, so a missing value means 1."""
        value = self.get_int("Clip skip")
        return 1 if value is None else value

    @property
    def denoising_strength(self) -> float | None:
        return self.get_float("Denoising strength")

    @property
    def model_name(self) -> str | None:
        return self.params.get("Model")

    @property
    def model_hash(self) -> str | None:
        return self.params.get("Model hash")


def parse_infotext(text: str) -> InfoText:
    """Parse A1111/Civitai "parameters" text; the inverse of :func:`build_infotext`."""
    *lines, last_line = text.strip().split("\n")
    pairs = _parse_params(last_line)
    if len(pairs) < 3:
        lines.append(last_line)
        pairs = []

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    return InfoText(
        prompt=_join_lines(prompt_lines),
        negative_prompt=_join_lines(negative_lines),
        params=dict(pairs),
    )


def _join_lines(lines: list[str]) -> str:
    """Join like A1111: leading empty lines vanish, later ones are kept."""
    text = ""
    for line in lines:
        text += ("" if text == "" else "\n") + line
    return text


def _schedule_label(schedule: str | None) -> str | None:
    """Canonical schedule-type label; unknown text is kept for the API to reject with choices."""
    from contract.samplers import resolve_schedule_type

    if schedule is None:
        return None
    try:
        return resolve_schedule_type(schedule)
    except ValueError:
        return schedule


def _sampler_and_schedule(sampler: str | None, schedule: str | None) -> tuple[str | None, str | None]:
    """Canonical sampler + schedule label; old names like "DPM++ 2M Karras" carry the schedule."""
    from contract.samplers import UnknownSamplerError, split_legacy_sampler_name

    label = _schedule_label(schedule)
    if sampler is None:
        return None, label
    try:
        name, legacy_schedule = split_legacy_sampler_name(sampler)
    except UnknownSamplerError:
        # Keep the user's text: the API will reject it with the list of valid samplers.
        return sampler, label
    if legacy_schedule is not None and label in (None, "Automatic"):
        label = legacy_schedule
    return name, label


def infotext_to_request_fields(info: InfoText) -> dict[str, object]:
    """Map a parsed infotext onto A1111 ``/sdapi/v1/txt2img`` request fields ("send to txt2img").

    Like A1111's paste, it is lenient: a malformed value is left out rather than failing the whole
    paste, and absent settings get A1111's defaults where A1111 resets them (``clip_skip`` 1,
    ``scheduler`` "Automatic", ``enable_hr`` False). The checkpoint goes into
    ``override_settings["sd_model_checkpoint"]`` (model name, else its hash), the VAE into
    ``override_settings["sd_vae"]``. A sampler name we do not know is passed through unchanged so
    the request validation reports it with the list of valid names.
    """
    fields: dict[str, object] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    overrides: dict[str, object] = {}

    def put(name: str, value: object) -> None:
        if value is not None:
            fields[name] = value

    put("steps", _safe(lambda: info.get_int("Steps")))
    sampler_name, schedule = _sampler_and_schedule(
        info.params.get("Sampler"), info.params.get("Schedule type")
    )
    put("sampler_name", sampler_name)
    fields["scheduler"] = schedule or "Automatic"
    put("cfg_scale", _safe(lambda: info.get_float("CFG scale")))
    put("seed", _safe(lambda: info.get_int("Seed")))
    put("subseed", _safe(lambda: info.get_int("Variation seed")))
    put("subseed_strength", _safe(lambda: info.get_float("Variation seed strength")))
    put("batch_size", _safe(lambda: info.get_int("Batch size")))
    put("eta", _safe(lambda: info.get_float("Eta")))

    size = _safe(lambda: info.get_size("Size"))
    first_pass = _safe(lambda: info.get_size("First pass size"))
    if first_pass is not None and first_pass != (0, 0) and size is not None:
        # Pre-1.0 hires infotexts: "Size" was the final size, "First pass size" the base one.
        fields["width"], fields["height"] = first_pass
        fields["hr_resize_x"], fields["hr_resize_y"] = size
    elif size is not None:
        fields["width"], fields["height"] = size

    seed_resize = _safe(lambda: info.get_size("Seed resize from"))
    if seed_resize is not None:
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = seed_resize

    fields["clip_skip"] = _safe(lambda: info.clip_skip) or 1
    put("denoising_strength", _safe(lambda: info.get_float("Denoising strength")))

    hires_keys = ("Hires upscale", "Hires upscaler", "Hires resize")
    fields["enable_hr"] = "Denoising strength" in info.params and (
        any(key in info.params for key in hires_keys) or first_pass is not None
    )
    put("hr_scale", _safe(lambda: info.get_float("Hires upscale")))
    put("hr_upscaler", info.params.get("Hires upscaler"))
    put("hr_second_pass_steps", _safe(lambda: info.get_int("Hires steps")))
    hires_resize = _safe(lambda: info.get_size("Hires resize"))
    if hires_resize is not None:
        fields["hr_resize_x"], fields["hr_resize_y"] = hires_resize
    hires_sampler, hires_schedule = _sampler_and_schedule(
        info.params.get("Hires sampler"), info.params.get("Hires schedule type")
    )
    put("hr_sampler_name", hires_sampler)
    put("hr_scheduler", hires_schedule)
    put("hr_checkpoint_name", info.params.get("Hires checkpoint"))
    put("hr_prompt", info.params.get("Hires prompt"))
    put("hr_negative_prompt", info.params.get("Hires negative prompt"))
    put("refiner_checkpoint", info.params.get("Refiner"))
    put("refiner_switch_at", _safe(lambda: info.get_float("Refiner switch at")))

    if info.params.get("Face restoration"):
        fields["restore_faces"] = True
        overrides["face_restoration_model"] = info.params["Face restoration"]
    if str(info.params.get("Tiling", "")).lower() == "true":
        fields["tiling"] = True
    put("cache_interval", _safe(lambda: info.get_int("Cache interval")))
    put("token_merging_ratio", _safe(lambda: info.get_float("Token merging ratio")))
    if str(info.params.get("VAE decode", "")).upper().startswith("TAESD"):
        fields["fast_decode"] = True

    model = info.params.get("Model") or info.params.get("Model hash")
    if model:
        overrides["sd_model_checkpoint"] = model
    if info.params.get("VAE"):
        overrides["sd_vae"] = info.params["VAE"]
    ensd = _safe(lambda: info.get_int("ENSD"))
    if ensd is not None:
        overrides["eta_noise_seed_delta"] = ensd
    if overrides:
        fields["override_settings"] = overrides
    return fields


def _safe(read: Callable[[], _T | None]) -> _T | None:
    """``read()``, or None when the infotext value is malformed (paste stays lenient)."""
    try:
        return read()
    except InfotextValueError:
        return None
