"""Live previews: the sampler's current latents turned into a small RGB image.

Two ways, as in A1111:

* **TAESD** (``AutoencoderTiny``), a tiny distilled VAE decoder, when its weights are in
  ``models/VAE-approx``: a diffusers folder ``taesd``/``taesdxl`` (``config.json`` + weights), or
  A1111's decoder-only files ``taesd_decoder.pth``/``taesdxl_decoder.pth`` (``.safetensors`` too).
* **cheap**: a fixed 4x3 linear map from the four latent channels to RGB. The coefficients are the
  published fit A1111 uses (``modules/sd_vae_approx.py``); it needs no weights and costs nothing.

The previewer belongs to the studio (one per process), not to a user: it only caches read-only
decoders. Preview failures never fail a job: they are logged and the cheap path is used.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

PreviewMode = Literal["auto", "taesd", "cheap", "none"]
PREVIEW_MODES: dict[str, str] = {
    "auto": "Auto (TAESD when present, else cheap)",
    "taesd": "TAESD",
    "cheap": "Approx cheap",
    "none": "None",
}
# Latent channel -> (R, G, B) weights; rows are the four latent channels.
SD_CHEAP_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
SDXL_CHEAP_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)
TAESD_NAMES = {False: "taesd", True: "taesdxl"}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
MAX_PREVIEW_IMAGES = 4  # a batch shows at most this many previews side by side


def _to_image(rgb: Any) -> Image.Image:
    """``(3, H, W)`` tensor in [-1, 1] -> PIL image."""
    from PIL import Image

    array = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def _side_by_side(images: list[Image.Image]) -> Image.Image:
    from PIL import Image

    if len(images) == 1:
        return images[0]
    width = sum(image.width for image in images)
    height = max(image.height for image in images)
    strip = Image.new("RGB", (width, height))
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    return strip


def cheap_preview(latents: Any, *, sdxl: bool = False) -> Image.Image | None:
    """Linear latent -> RGB approximation at 8x the latent size; None for non-4-channel latents."""
    import torch
    from PIL import Image

    sample = latents.detach()
    if sample.ndim == 3:
        sample = sample.unsqueeze(0)
    if sample.ndim != 4 or sample.shape[1] != 4:
        return None
    coefficients = torch.tensor(SDXL_CHEAP_COEFFICIENTS if sdxl else SD_CHEAP_COEFFICIENTS)
    sample = sample[:MAX_PREVIEW_IMAGES].float().cpu()
    rgb = torch.einsum("bchw,cr->brhw", sample, coefficients)
    images = [_to_image(item) for item in rgb]
    images = [
        image.resize((image.width * 8, image.height * 8), Image.Resampling.BILINEAR) for image in images
    ]
    return _side_by_side(images)


def taesd_state_dict_to_diffusers(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys of a TAESD decoder file -> keys of ``AutoencoderTiny.decoder``.

    A1111's ``taesd_decoder.pth`` is the original ``nn.Sequential`` whose layer 0 is a clamp with
    no weights; diffusers' ``DecoderTiny.layers`` does the clamp in ``forward`` instead, so every
    layer index is one lower. Files already in diffusers layout (``decoder.layers.*``) keep their
    decoder keys.
    """
    converted: dict[str, Any] = {}
    if any(key.startswith("decoder.") for key in state_dict):
        for key, value in state_dict.items():
            if key.startswith("decoder."):
                converted[key.removeprefix("decoder.")] = value
        return converted
    for key, value in state_dict.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or not rest:
            raise ValueError(f"unexpected key {key!r} in a TAESD decoder file")
        converted[f"layers.{int(index) - 1}.{rest}"] = value
    return converted


class LatentPreviewer:
    """Renders previews; TAESD decoders are loaded on first use and kept (they are ~5 MB)."""

    def __init__(self, vae_approx_dir: Path) -> None:
        self.vae_approx_dir = Path(vae_approx_dir)
        self._lock = threading.Lock()
        self._decoders: dict[bool, Any] = {}  # sdxl? -> AutoencoderTiny (or None: not available)

    def taesd_source(self, *, sdxl: bool) -> Path | None:
        """The TAESD weights for this family in ``models/VAE-approx``, if any."""
        name = TAESD_NAMES[sdxl]
        folder = self.vae_approx_dir / name
        if (folder / "config.json").is_file():
            return folder
        for stem in (f"{name}_decoder", name):
            for suffix in WEIGHT_SUFFIXES:
                candidate = self.vae_approx_dir / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
        return None

    def _load_taesd(self, source: Path) -> Any:
        import torch
        from diffusers import AutoencoderTiny

        if source.is_dir():
            model = AutoencoderTiny.from_pretrained(source, local_files_only=True)
        else:
            if source.suffix == ".safetensors":
                from safetensors.torch import load_file

                state_dict = load_file(str(source))
            else:
                state_dict = torch.load(source, map_location="cpu", weights_only=True)
            model = AutoencoderTiny()
            model.decoder.load_state_dict(taesd_state_dict_to_diffusers(state_dict))
        return model.eval().requires_grad_(False)

    def _taesd(self, *, sdxl: bool) -> Any:
        with self._lock:
            if sdxl in self._decoders:
                return self._decoders[sdxl]
            source = self.taesd_source(sdxl=sdxl)
            model = None
            if source is not None:
                try:
                    model = self._load_taesd(source)
                    log.info("live previews use TAESD from %s", source)
                except Exception as exc:  # any unreadable file (safetensors raises its own type)
                    log.warning("cannot load TAESD weights %s (%s); using the cheap preview", source, exc)
            self._decoders[sdxl] = model
            return model

    def taesd_decoder(self, *, sdxl: bool) -> Any:
        """The loaded TAESD (``AutoencoderTiny``) for this family, or None when its weights are absent
        (the engine's ``fast_decode`` uses it for the final decode)."""
        return self._taesd(sdxl=sdxl)

    def forget(self) -> None:
        """Drop loaded decoders (after weights were added to or removed from models/VAE-approx)."""
        with self._lock:
            self._decoders.clear()

    def render(self, latents: Any, *, sdxl: bool = False, mode: str = "auto") -> Image.Image | None:
        """A preview of ``latents`` (``(B, 4, h, w)``), or None when previews are off/impossible."""
        if latents is None or mode == "none" or not hasattr(latents, "shape"):
            return None
        try:
            if mode in ("auto", "taesd"):
                decoder = self._taesd(sdxl=sdxl)
                if decoder is not None:
                    return self._decode_taesd(decoder, latents)
            return cheap_preview(latents, sdxl=sdxl)
        except (RuntimeError, ValueError, TypeError) as exc:
            log.warning("live preview failed (%s)", exc)
            return None

    def _decode_taesd(self, decoder: Any, latents: Any) -> Image.Image | None:
        import torch

        sample = latents.detach()
        if sample.ndim == 3:
            sample = sample.unsqueeze(0)
        if sample.ndim != 4 or sample.shape[1] != 4:
            return None
        sample = sample[:MAX_PREVIEW_IMAGES]
        with self._lock, torch.inference_mode():
            decoder.to(device=sample.device, dtype=torch.float32)
            decoded = decoder.decode(sample.float()).sample
        return _side_by_side([_to_image(item) for item in decoded])
