"""Memory and speed options for diffusers pipelines: SD Studio's take on AUTOMATIC1111's flags.

How A1111's command-line flags map onto :class:`MemoryOptions`:

- ``--medvram``: preset ``"medvram"`` (whole-model CPU offload + VAE slicing).
- ``--lowvram``: preset ``"lowvram"`` (diffusers' block-level group offloading, with CUDA streams
  that prefetch the next block, + attention slicing + VAE slicing and tiling). A1111's own path,
  layer-by-layer sequential CPU offload, is preset ``"lowvram-sequential"`` (and the OOM fallback
  after ``lowvram``).
- ``--fp8-unet``: ``fp8_unet=True``: UNet weights stored in float8 (e4m3fn) and cast layer by layer
  to the compute dtype (diffusers' layerwise casting); the VAE and text encoders keep their dtype.
- ``--xformers``: ``attention="xformers"``; ``"auto"`` (the default) picks it when installed.
- ``--opt-sdp-attention``: ``attention="sdpa"``, PyTorch's scaled-dot-product attention, which is
  also diffusers' default processor (``AttnProcessor2_0``).
- ``--no-half``: ``dtype="fp32"``.
- ``--no-half-vae``: ``no_half_vae=True``; ``upcast_vae_on_nan`` covers the automatic case.
- ``--upcast-sampling``: no field. Diffusers' Euler and DPM-Solver schedulers already do their step
  arithmetic in float32; ``dtype="fp32"`` covers the rest.
- ``--opt-channelslast``: ``channels_last=True``.

:func:`apply_memory_options` applies the options to a loaded pipeline and returns one log line per
option. It never fails because the machine lacks something: an option that needs CUDA, xFormers,
Triton or accelerate becomes ``"<option>: not applied (<reason>)"``. Nothing heavy is imported at
module import time; xFormers is only ever imported by diffusers, and only when it is used.
"""

from __future__ import annotations

import gc
import importlib.util
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

DtypeChoice = Literal["auto", "fp16", "bf16", "fp32"]
AttentionChoice = Literal["auto", "sdpa", "xformers", "slicing", "default"]
OffloadChoice = Literal["none", "model", "sequential", "group"]
SliceSize = Literal["auto", "max"]

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_GIB = 1024**3


class DeviceUnavailableError(ValueError):
    """``MemoryOptions.device`` names a device this PyTorch cannot use."""


class MemoryOptions(BaseModel):
    """How a pipeline is placed, cast and optimised. Immutable so presets can be shared safely.

    Every field has the safe default for "load and run"; the presets in :data:`MEMORY_PRESETS`
    bundle the combinations A1111 users know.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    dtype: DtypeChoice = "auto"
    """Weights and compute dtype. ``auto``: float16 on CUDA, float32 everywhere else."""
    no_half_vae: bool = False
    """Keep the VAE in float32 while the rest runs in half precision (A1111's ``--no-half-vae``)."""
    upcast_vae_on_nan: bool = True
    """Let the engine re-decode in float32 when a half-precision VAE returns NaN (black images)."""
    tf32: bool = True
    """Allow TensorFloat-32 for float32 matmuls/convolutions on Ampere (RTX 30xx) and newer."""
    attention: AttentionChoice = "auto"
    """``auto``: xFormers when installed and on CUDA, else PyTorch SDPA. ``default``: leave as loaded."""
    attention_slicing: bool | SliceSize = False
    """Sliced attention; ``True`` means ``"auto"`` (two slices), ``"max"`` one head at a time."""
    vae_slicing: bool = False
    """Decode a batch one image at a time."""
    vae_tiling: bool = False
    """Decode/encode large images in overlapping tiles."""
    offload: OffloadChoice = "none"
    """``model``: one whole model on the GPU at a time; ``sequential``: one layer at a time;
    ``group``: one UNet/VAE block at a time, the next one prefetched on a CUDA stream."""
    fp8_unet: bool = False
    """Store the UNet's weights in float8 (e4m3fn), computing in ``dtype`` (halves them vs fp16)."""
    channels_last: bool = False
    """UNet weights in NHWC layout, which some GPUs' convolution kernels prefer."""
    compile: bool = False
    """``torch.compile`` the UNet with ``mode="reduce-overhead"`` (CUDA graphs; slow first run)."""
    device: str = "auto"
    """``auto`` (CUDA, else Apple MPS, else CPU), ``cpu``, ``mps``, ``cuda`` or ``cuda:N``."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        normalised = value.strip().lower()
        if not _DEVICE_PATTERN.match(normalised):
            raise ValueError(f"use 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N' (got {value!r})")
        return normalised


MEMORY_PRESETS: Mapping[str, MemoryOptions] = MappingProxyType(
    {
        # Everything resident on the GPU in half precision; fastest.
        "high": MemoryOptions(dtype="fp16", attention="auto", offload="none"),
        # A1111 --medvram: only the model that is running (text encoder, UNet or VAE) sits on the GPU.
        "medvram": MemoryOptions(dtype="fp16", attention="auto", offload="model", vae_slicing=True),
        # --lowvram: weights stream to the GPU block by block (group offloading, prefetched on a
        # CUDA stream); fits 2-4 GB cards.
        "lowvram": MemoryOptions(
            dtype="fp16",
            attention="auto",
            attention_slicing=True,
            offload="group",
            vae_slicing=True,
            vae_tiling=True,
        ),
        # A1111's --lowvram: layer-by-layer sequential CPU offload; the least VRAM, the slowest.
        "lowvram-sequential": MemoryOptions(
            dtype="fp16",
            attention="auto",
            attention_slicing=True,
            offload="sequential",
            vae_slicing=True,
            vae_tiling=True,
        ),
        # No GPU: float32 (CPU half-precision kernels are slow and incomplete), nothing CUDA.
        "cpu": MemoryOptions(dtype="fp32", attention="sdpa", tf32=False, device="cpu"),
    }
)
"""Named option bundles. Read-only: a caller changing a shared preset would change it for everyone."""

_LOWER_PRESET: Mapping[str, str | None] = MappingProxyType(
    {
        "high": "medvram",
        "medvram": "lowvram",
        "lowvram": "lowvram-sequential",
        "lowvram-sequential": None,
        "cpu": None,
    }
)

# Model families by how much VRAM their float16 weights need:
#   SD1.x: UNet 1.7 GB + CLIP-L 0.25 GB + VAE 0.17 GB  ~ 2.1 GB
#   SD2.x: UNet 1.7 GB + OpenCLIP-H 0.7 GB + VAE       ~ 2.6 GB
#   SDXL:  UNet 5.1 GB + CLIP-L + OpenCLIP-bigG 1.4 GB + VAE ~ 6.9 GB
_FAMILY_SIZE: Mapping[str, Literal["small", "large"]] = MappingProxyType(
    {
        "sd1": "small",
        "sd15": "small",
        "sd1.5": "small",
        "sd2": "small",
        "sd21": "small",
        "sd2.1": "small",
        "sdxl": "large",
        "sdxl-refiner": "large",  # UNet 4.5 GB + OpenCLIP-bigG 1.4 GB: sized like SDXL
    }
)

# (at least this much for "high", at least this much for "medvram"), in GiB; less means "lowvram".
# Each is half a GiB under a card's nominal size because drivers report a little less than the
# label (an "8 GB" card shows ~7.99 GiB, some laptop parts less).
#   SD1/SD2 ("small"): 6 GB+ -> high (~2.6 GB weights + ~1.5 GB activations at 512-768 px);
#                      4 GB  -> medvram (UNet alone + activations fits);  <4 GB -> lowvram.
#   SDXL ("large"):    12 GB+ -> high (~6.9 GB weights + ~2-3 GB activations at 1024 px);
#                      8 GB   -> medvram (UNet 5.1 GB + activations);     4-6 GB -> lowvram.
VRAM_THRESHOLDS_GIB: Mapping[str, tuple[float, float]] = MappingProxyType(
    {"small": (5.5, 3.5), "large": (11.5, 7.5)}
)


def preset_for_vram(total_vram_bytes: int | None, family: str) -> str:
    """Pick a :data:`MEMORY_PRESETS` name for a GPU's total memory and a model family.

    ``total_vram_bytes`` is ``torch.cuda.get_device_properties(i).total_memory``, or ``None`` when
    there is no CUDA GPU (-> ``"cpu"``). ``family``: a ``ModelFamily.base`` (``sd1``, ``sd2``,
    ``sdxl``, ``sdxl-refiner``) or an alias (``sd15``, ``sd1.5``, ``sd21``, ``sd2.1``).
    Thresholds are in :data:`VRAM_THRESHOLDS_GIB`. They are a first guess: the engine falls back
    with :func:`lower_memory_preset` when a generation still runs out of memory.
    """
    size = _FAMILY_SIZE.get(family.strip().lower())
    if size is None:
        raise ValueError(
            f"Unknown model family {family!r} for choosing a memory preset; "
            f"use one of: {', '.join(_FAMILY_SIZE)}."
        )
    if total_vram_bytes is None:
        return "cpu"
    if total_vram_bytes <= 0:
        raise ValueError(f"total_vram_bytes must be positive or None (no GPU), got {total_vram_bytes}.")
    high_at_least, medvram_at_least = VRAM_THRESHOLDS_GIB[size]
    vram_gib = total_vram_bytes / _GIB
    if vram_gib >= high_at_least:
        return "high"
    if vram_gib >= medvram_at_least:
        return "medvram"
    return "lowvram"


def lower_memory_preset(name: str) -> str | None:
    """The next preset that uses less GPU memory (high -> medvram -> lowvram -> lowvram-sequential),
    or None at the end."""
    if name not in _LOWER_PRESET:
        raise ValueError(f"Unknown memory preset {name!r}; use one of: {', '.join(MEMORY_PRESETS)}.")
    return _LOWER_PRESET[name]


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def _module_installed(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (xFormers' import is slow and noisy)."""
    return importlib.util.find_spec(name) is not None


def _xformers_installed() -> bool:
    return _module_installed("xformers")


def _accelerate_installed() -> bool:
    return _module_installed("accelerate")


def _triton_installed() -> bool:
    return _module_installed("triton")


def resolve_device(options: MemoryOptions) -> torch.device:
    """The torch device ``options.device`` means on this machine.

    ``auto`` never fails (CUDA, else MPS, else CPU). An explicit device the machine does not have
    raises :class:`DeviceUnavailableError`: silently running a "cuda" job on the CPU would look
    like a hang to the user.
    """
    import torch

    if options.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(options.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device={options.device!r} is set but this PyTorch sees no CUDA GPU (a CPU-only "
                "PyTorch build or a driver problem). Set device to 'auto' or 'cpu', or install a CUDA "
                "build of PyTorch (README: 'Choosing a CUDA build of PyTorch')."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(
                f"device={options.device!r} is set but only {count} CUDA GPU(s) are visible "
                f"(cuda:0 to cuda:{count - 1}); pick one of those or 'auto'."
            )
    if device.type == "mps" and not _mps_available():
        raise DeviceUnavailableError(
            f"device={options.device!r} is set but Apple MPS is not available here; use 'auto' or 'cpu'."
        )
    return device


def _choose_dtype(options: MemoryOptions, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype for ``options.dtype`` on ``device``, and why (for the log line)."""
    import torch

    requested = options.dtype
    if requested == "fp32":
        return torch.float32, "float32"
    if device.type == "cuda":
        if requested == "bf16":
            # Native bf16 only (Ampere / RTX 30xx and newer); emulated bf16 on older cards is slow.
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return torch.bfloat16, "bfloat16"
            return torch.float16, "float16 (bf16 needs an RTX 30xx / Ampere or newer GPU)"
        return torch.float16, "float16" + (" (auto on CUDA)" if requested == "auto" else "")
    if device.type == "mps" and requested == "fp16":
        return torch.float16, "float16"
    if requested == "auto":
        return torch.float32, f"float32 (auto on {device.type})"
    if requested == "bf16":
        reason = "bf16 needs a CUDA GPU that supports it"
    else:
        reason = "half precision is slow and incomplete on the CPU"
    return torch.float32, f"float32 ({requested} requested; {reason})"


def resolve_dtype(options: MemoryOptions, device: torch.device) -> torch.dtype:
    """The weights/compute dtype for ``options.dtype`` on ``device``.

    ``auto`` is float16 on CUDA and float32 elsewhere; ``bf16`` is used only where the GPU supports
    it natively (else float16 on CUDA); the CPU always gets float32.
    """
    return _choose_dtype(options, device)[0]


def keep_vae_float32(pipe: DiffusionPipeline, compute_dtype: torch.dtype | None = None) -> None:
    """Run the VAE in float32 inside a half-precision pipeline (A1111's ``--no-half-vae``).

    Diffusers' SD1/SD2 pipelines hand the VAE latents in the UNet's dtype and feed what
    ``vae.encode`` returns straight to the UNet, so a float32 VAE alone fails with a dtype mismatch.
    Hooks on the VAE's entry layers cast incoming tensors to the VAE's dtype, and the encoder's
    output is cast back to ``compute_dtype`` (default: the UNet's dtype). The VAE config's
    ``force_upcast`` is switched off: SDXL pipelines would otherwise cast the VAE back to float16
    after every img2img encode. Calling this again replaces the earlier hooks. The engine also calls
    it as its "black image" fallback when :func:`decode_has_nan` finds NaN.
    """
    import torch

    vae = pipe.vae
    if compute_dtype is None:
        compute_dtype = pipe.unet.dtype
    for handle in getattr(vae, "_sd_studio_float32_hooks", ()):
        handle.remove()
    if vae.dtype != torch.float32:
        vae.to(dtype=torch.float32)
    if getattr(vae.config, "force_upcast", False):
        vae.register_to_config(force_upcast=False)

    def cast_inputs_to_module_dtype(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module_dtype = next(module.parameters()).dtype
        return tuple(
            arg.to(module_dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg
            for arg in args
        )

    def cast_output_to_compute_dtype(
        _module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return output.to(compute_dtype)

    handles = []
    entry_layers = [vae.encoder, getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)]
    entry_layers.append(vae.decoder)
    for layer in entry_layers:
        if layer is not None:
            handles.append(layer.register_forward_pre_hook(cast_inputs_to_module_dtype))
    encoder_exit = getattr(vae, "quant_conv", None) or vae.encoder
    if compute_dtype != torch.float32:
        handles.append(encoder_exit.register_forward_hook(cast_output_to_compute_dtype))
    vae._sd_studio_float32_hooks = handles


def apply_memory_options(pipe: DiffusionPipeline, options: MemoryOptions, device: torch.device) -> list[str]:
    """Apply ``options`` to a loaded SD1/SD2/SDXL diffusers pipeline on ``device``.

    Order matters and is: dtype cast (on the CPU, before the move, so an SDXL pipeline loaded in
    float32 never needs 10 GB of VRAM), float32 VAE, memory layout, attention, VAE slicing/tiling,
    then placement (offload replaces ``pipe.to(device)``), then compile. Returns one line per
    option: what was applied, or ``"<option>: not applied (<reason>)"``. Missing CUDA, xFormers,
    Triton or accelerate never raises; each becomes such a line.
    """
    is_cuda = device.type == "cuda"
    lines = [f"device: {device}"]

    dtype, dtype_note = _choose_dtype(options, device)
    _cast_components(pipe, dtype, options)
    lines.append(f"dtype: {dtype_note}")
    lines.append(_apply_no_half_vae(pipe, options, dtype))
    lines.append(_describe_upcast_on_nan(pipe, options, dtype))
    lines.append(_apply_tf32(options, is_cuda))
    lines.append(_apply_channels_last(pipe, options))
    lines.append(_apply_fp8_unet(pipe, options, dtype))
    lines.extend(_apply_attention(pipe, options, is_cuda))
    lines.append(_apply_vae_flag(pipe, "vae_slicing", options.vae_slicing))
    lines.append(_apply_vae_flag(pipe, "vae_tiling", options.vae_tiling))
    lines.append(_apply_placement(pipe, options, device))
    lines.append(_apply_compile(pipe, options, is_cuda))
    return lines


def _cast_components(pipe: DiffusionPipeline, dtype: torch.dtype, options: MemoryOptions) -> None:
    """Each model to ``dtype``, only where needed (diffusers logs a warning on every cast), except a
    UNet already stored in float8 (``--fp8-unet``; a cast would undo it and double its memory), a
    float32 VAE that ``no_half_vae`` keeps, and group-offloaded models (their offload copies would
    bring the old dtype back; ``pipe.to`` skips them too)."""
    import torch

    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module) or getattr(module, "dtype", dtype) == dtype:
            continue
        if name == "unet" and unet_weights_in_fp8(module):
            continue
        if name == "vae" and options.no_half_vae and module.dtype == torch.float32:
            continue
        if _group_offloaded(module):
            continue
        module.to(dtype=dtype)


def _apply_no_half_vae(pipe: DiffusionPipeline, options: MemoryOptions, dtype: torch.dtype) -> str:
    import torch

    vae = getattr(pipe, "vae", None)
    if vae is None:
        return "no_half_vae: not applied (this pipeline has no VAE)"
    if dtype == torch.float32:
        state = "not needed" if options.no_half_vae else "off"
        return f"no_half_vae: {state} (the whole pipeline is float32)"
    if options.no_half_vae:
        keep_vae_float32(pipe, dtype)
        return "no_half_vae: VAE kept in float32 (inputs cast at its boundary)"
    if getattr(vae.config, "force_upcast", False):
        return (
            "no_half_vae: off (VAE in half precision; its config has force_upcast=True, so diffusers' "
            "SDXL pipelines decode in float32 per call)"
        )
    return "no_half_vae: off (VAE in half precision)"


def _describe_upcast_on_nan(pipe: DiffusionPipeline, options: MemoryOptions, dtype: torch.dtype) -> str:
    """A log line only: the NaN check and re-decode happen in the engine (see decode_has_nan)."""
    import torch

    if not options.upcast_vae_on_nan:
        return "upcast_vae_on_nan: off"
    vae = getattr(pipe, "vae", None)
    if vae is None or vae.dtype == torch.float32 or dtype == torch.float32:
        return "upcast_vae_on_nan: not needed (the VAE runs in float32)"
    return "upcast_vae_on_nan: on (a NaN decode is redone with the VAE in float32)"


def _apply_tf32(options: MemoryOptions, is_cuda: bool) -> str:
    """Set TF32 from the options every time.

    The flags are process-wide, so whatever the previous pipeline (or a library: transformers and
    accelerate both set them) left behind would otherwise leak into this one. The legacy
    ``allow_tf32`` setters are used on purpose: torch's own dynamo/inductor still read them, and in
    torch 2.9+ reading them after the newer ``fp32_precision`` API was used raises "mix of the
    legacy and new APIs".
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = options.tf32
    torch.backends.cudnn.allow_tf32 = options.tf32
    if not is_cuda:
        return "tf32: not applied (no CUDA device)"
    if options.tf32:
        return "tf32: on (float32 matmuls/convolutions use TensorFloat-32 on RTX 30xx and newer)"
    return "tf32: off (full float32 precision)"


def _apply_channels_last(pipe: DiffusionPipeline, options: MemoryOptions) -> str:
    import torch

    if not options.channels_last:
        return "channels_last: off"
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return "channels_last: not applied (this pipeline has no UNet)"
    unet.to(memory_format=torch.channels_last)
    return "channels_last: UNet weights in channels-last memory format"


FP8_MARKER = "_sd_studio_fp8_storage"


def unet_weights_in_fp8(unet: Any) -> bool:
    """Whether ``unet`` keeps its weights in float8 (``--fp8-unet``)."""
    return bool(getattr(unet, FP8_MARKER, False))


def _apply_fp8_unet(pipe: DiffusionPipeline, options: MemoryOptions, dtype: torch.dtype) -> str:
    """Layerwise casting: weights stored in float8 e4m3fn, each layer cast to ``dtype`` while it runs.

    diffusers keeps the UNet's normalisation layers in ``dtype`` (``_skip_layerwise_casting_patterns``).
    Once applied it stays for the loaded model (float8 rounding cannot be undone without reloading).
    """
    import torch

    unet = getattr(pipe, "unet", None)
    if not options.fp8_unet:
        if unet is not None and unet_weights_in_fp8(unet):
            return "fp8_unet: off, but this loaded UNet already stores float8 weights (reload the model)"
        return "fp8_unet: off"
    if unet is None or not hasattr(unet, "enable_layerwise_casting"):
        return "fp8_unet: not applied (this pipeline has no diffusers UNet)"
    if not hasattr(torch, "float8_e4m3fn"):
        return "fp8_unet: not applied (this PyTorch has no float8 dtype)"
    if not unet_weights_in_fp8(unet):
        unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        setattr(unet, FP8_MARKER, True)
    return f"fp8_unet: UNet weights stored in float8_e4m3fn, computed in {str(dtype).removeprefix('torch.')}"


def _attention_processors_with_weights(model: Any) -> list[str]:
    """Class names of processors that carry weights (IP-Adapter, custom diffusion...)."""
    import torch

    processors = getattr(model, "attn_processors", {})
    return sorted({type(p).__name__ for p in processors.values() if isinstance(p, torch.nn.Module)})


def _use_sdpa(pipe: DiffusionPipeline) -> str:
    """Give the UNet and VAE PyTorch's SDPA processor, leaving adapters' weighted processors alone."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    changed, kept = [], []
    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is None or not hasattr(model, "set_attn_processor"):
            continue
        adapters = _attention_processors_with_weights(model)
        if adapters:
            kept.append(
                f"{name} kept as loaded, it has adapter processors with weights: {', '.join(adapters)}"
            )
            continue
        model.set_attn_processor(AttnProcessor2_0())
        changed.append(name)
    line = f"attention: PyTorch SDPA (AttnProcessor2_0) on {' and '.join(changed) or 'no model'}"
    return line + (f" ({'; '.join(kept)})" if kept else "")


def _slice_size(options: MemoryOptions) -> SliceSize:
    return "auto" if isinstance(options.attention_slicing, bool) else options.attention_slicing


def _apply_attention(pipe: DiffusionPipeline, options: MemoryOptions, is_cuda: bool) -> list[str]:
    """Attention kernel first, then slicing: diffusers' slicing replaces the processors it touches."""
    lines = []
    choice = options.attention
    if choice == "auto":
        choice = "xformers" if is_cuda and _xformers_installed() else "sdpa"
    if choice == "xformers":
        lines.append(_try_xformers(pipe, options, is_cuda))
    elif choice == "sdpa":
        lines.append(_use_sdpa(pipe))
    elif choice == "slicing":
        pipe.enable_attention_slicing(_slice_size(options))
        lines.append(f"attention: sliced attention (slice_size={_slice_size(options)!r})")
    else:
        unet = getattr(pipe, "unet", None)
        kinds = sorted({type(p).__name__ for p in getattr(unet, "attn_processors", {}).values()})
        lines.append(f"attention: left as loaded ({', '.join(kinds) or 'no attention layers'})")

    if options.attention_slicing is False:
        lines.append("attention_slicing: off")
    elif choice == "slicing":
        lines.append(f"attention_slicing: slice_size={_slice_size(options)!r} (used by attention='slicing')")
    else:
        pipe.enable_attention_slicing(_slice_size(options))
        lines.append(
            f"attention_slicing: on (slice_size={_slice_size(options)!r}; sliced processors replace "
            "the attention chosen above on the sliceable layers)"
        )
    return lines


def _try_xformers(pipe: DiffusionPipeline, options: MemoryOptions, is_cuda: bool) -> str:
    """xFormers, falling back to SDPA with the reason: the wheel must match the exact torch build."""
    if not is_cuda:
        reason = "xFormers needs a CUDA GPU"
    elif not _xformers_installed():
        reason = "xFormers is not installed: pip install -r requirements-xformers.txt"
    else:
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except (ImportError, RuntimeError, ValueError, NotImplementedError) as exc:
            # Typically an xFormers wheel built for another torch/CUDA version.
            reason = f"xFormers failed to start: {exc}"
        else:
            prefix = "auto: " if options.attention == "auto" else ""
            return f"attention: {prefix}xFormers memory-efficient attention"
    return f"attention: xformers not applied ({reason}); {_use_sdpa(pipe).removeprefix('attention: ')}"


def _apply_vae_flag(pipe: DiffusionPipeline, option: str, enabled: bool) -> str:
    """VAE slicing/tiling via ``pipe.vae.enable_slicing()`` / ``enable_tiling()``.

    diffusers 0.42 removed the pipeline-level ``enable_vae_slicing``/``enable_vae_tiling``; the
    pipeline methods are only used as a fallback for older releases. Disabling when the option is
    off keeps re-applying options (the engine's OOM retry) declarative.
    """
    what = "slicing" if option == "vae_slicing" else "tiling"
    vae = getattr(pipe, "vae", None)
    method = getattr(vae, f"enable_{what}" if enabled else f"disable_{what}", None)
    if method is None:
        method = getattr(pipe, f"enable_vae_{what}" if enabled else f"disable_vae_{what}", None)
    if method is None:
        if not enabled:
            return f"{option}: off"
        return f"{option}: not applied (this pipeline's VAE does not support {what})"
    method()
    if not enabled:
        return f"{option}: off"
    if what == "slicing":
        return "vae_slicing: on (a batch is decoded one image at a time)"
    return "vae_tiling: on (large images are decoded in overlapping tiles)"


def _apply_placement(pipe: DiffusionPipeline, options: MemoryOptions, device: torch.device) -> str:
    """Offload (which manages devices itself) or a plain ``pipe.to(device)``."""
    if options.offload == "group":
        return _apply_group_offload(pipe, device)
    if options.offload != "none":
        if device.type != "cuda":
            reason = f"CPU offload needs a CUDA GPU; the pipeline runs on {device}"
        elif not _accelerate_installed():
            reason = "CPU offload needs the accelerate package: pip install -r requirements.txt"
        else:
            return place_with_offload(pipe, options.offload, device)
        place_with_offload(pipe, "none", device)
        return f"offload: not applied ({reason})"
    return place_with_offload(pipe, "none", device)


OFFLOAD_DESCRIPTIONS = {
    "none": "offload: none (pipeline moved to {device})",
    "model": "offload: model CPU offload to {device} (one model on the GPU at a time)",
    "sequential": "offload: sequential CPU offload to {device} (weights stream in layer by layer)",
    "group": "offload: block-level group offloading to {device} (next block prefetched on a CUDA stream)",
}


def place_with_offload(pipe: DiffusionPipeline, offload: str, device: torch.device) -> str:
    """Put ``pipe`` on ``device`` the ``offload`` way, first undoing another way applied before.

    The OOM retry lowers the preset of the pipeline already loaded (``medvram`` -> ``lowvram`` ->
    ``lowvram-sequential``) and Settings can change it: diffusers refuses group offloading over
    accelerate's model/sequential hooks and those over group offloading, and ``pipe.to`` does not
    move group-offloaded models; so the previous way is taken off here. No device check: the callers
    decide (tests run every switch with ``device`` the CPU).
    """

    unet = getattr(pipe, "unet", None)
    if offload != "none" and unet is not None and unet_compiled(unet):
        unet._compiled_call_impl = None  # CUDA graphs would replay over weights that now move
    if offload != "group":
        _remove_group_offload(pipe)
    if offload in ("none", "group"):
        _remove_accelerate_offload(pipe)
    if offload == "group":
        if not any(_group_offloaded(module) for module in pipe.components.values()):
            _enable_group_offload(pipe, device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return OFFLOAD_DESCRIPTIONS[offload].format(device=device)


def _enable_group_offload(pipe: DiffusionPipeline, device: torch.device) -> None:
    """Block-level group offloading of every model, prefetching on a CUDA stream, except the VAE.

    With a stream, diffusers onloads from CPU copies taken when offloading is applied, so a later
    ``vae.to(torch.float32)`` (SDXL's upcast decode, the NaN re-decode) would be undone at the next
    onload and the decode fail on mixed dtypes; without one, onloading moves the current weights.
    The VAE runs once per image, so its prefetch is worth little anyway.
    """
    import torch
    from diffusers.hooks import apply_group_offloading

    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        options = {
            "onload_device": device,
            "offload_device": torch.device("cpu"),
            "offload_type": "block_level",
            "num_blocks_per_group": 1,
            "use_stream": device.type == "cuda" and name != "vae",
        }
        if hasattr(module, "enable_group_offload"):
            module.enable_group_offload(**options)
        else:
            apply_group_offloading(module=module, **options)


def _remove_group_offload(pipe: DiffusionPipeline) -> None:
    """Take diffusers' group offloading (and its block-order tracer) off every model; their weights
    stay where the last offload left them (the CPU)."""
    from diffusers.hooks import HookRegistry

    for module in pipe.components.values():
        if _group_offloaded(module):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
                registry.remove_hook(name, recurse=True)
            module.to("cpu")


def _remove_accelerate_offload(pipe: DiffusionPipeline) -> None:
    """Take accelerate's model/sequential offload hooks off (weights come back from its CPU copy)."""
    if any(hasattr(module, "_hf_hook") for module in pipe.components.values()):
        pipe.remove_all_hooks()


def _apply_group_offload(pipe: DiffusionPipeline, device: torch.device) -> str:
    """diffusers' block-level group offloading: each block's weights come to the GPU just before it
    runs, the next block's on a CUDA stream meanwhile (much faster than layer-by-layer sequential
    offload, close to it in VRAM)."""
    if device.type != "cuda":
        place_with_offload(pipe, "none", device)
        return f"offload: not applied (group offloading needs a CUDA GPU; the pipeline runs on {device})"
    if any(_group_offloaded(module) for module in pipe.components.values()):
        return f"offload: group offloading to {device} (already applied)"
    return place_with_offload(pipe, "group", device)


def _group_offloaded(module: Any) -> bool:
    """Whether group offloading sits on ``module`` or any of its submodules (the VAE's is applied to
    its encoder and decoder, not to the VAE itself)."""
    import torch

    if not isinstance(module, torch.nn.Module):
        return False
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("group_offloading") is not None:
            return True
    return False


def compile_refusal(options: MemoryOptions, is_cuda: bool, unet: Any) -> str | None:
    """Why ``options.compile`` cannot compile ``unet`` here, or None when it will be (or is) compiled."""
    if not options.compile:
        return "off"
    if unet is None:
        return "not applied (this pipeline has no UNet)"
    if not is_cuda:
        return "not applied (mode='reduce-overhead' uses CUDA graphs and needs a CUDA GPU)"
    if options.offload != "none":
        return (
            f"not applied (CUDA graphs need the UNet's weights to stay on the GPU; "
            f"offload={options.offload!r} moves them)"
        )
    if options.fp8_unet or unet_weights_in_fp8(unet):
        return "not applied (fp8 weights are cast layer by layer, which breaks the graph at every layer)"
    if not _triton_installed():
        return "not applied (torch.compile needs Triton, which is not installed)"
    return None


def unet_compiled(unet: Any) -> bool:
    """Whether ``unet`` runs compiled (``Module.compile``)."""
    return getattr(unet, "_compiled_call_impl", None) is not None


def _apply_compile(pipe: DiffusionPipeline, options: MemoryOptions, is_cuda: bool) -> str:
    """Compile the UNet in place (``Module.compile``) so ``pipe.unet`` keeps its type and config."""
    unet = getattr(pipe, "unet", None)
    refusal = compile_refusal(options, is_cuda, unet)
    if refusal is not None:
        return f"compile: {refusal}"
    if unet_compiled(unet):
        return "compile: UNet already compiled"
    unet.compile(mode="reduce-overhead")
    return "compile: UNet compiled with mode='reduce-overhead' (the first generation is slow)"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) is the accelerator running out of memory.

    Recognises ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class in
    current torch, checked too for older builds) and RuntimeErrors whose message says "out of
    memory" (CUDA caching allocator, MPS) or a cuBLAS allocation failure.
    """
    import torch

    oom_types = tuple(
        t
        for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if isinstance(t, type)
    )
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if oom_types and isinstance(current, oom_types):
            return True
        if isinstance(current, RuntimeError):
            message = str(current).lower()
            if "out of memory" in message or "cublas_status_alloc_failed" in message:
                return True
        current = current.__cause__ or current.__context__
    return False


def free_accelerator_memory() -> None:
    """Collect garbage and return cached GPU blocks to the driver (before a retry or a model swap)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif _mps_available():
        torch.mps.empty_cache()


def decode_has_nan(image_tensor: Any) -> bool:
    """Whether a decoded image holds NaN or infinity: a half-precision VAE overflowed (black image).

    Accepts a torch tensor or a numpy array (``output_type="pt"`` or ``"np"``); PIL images cannot
    carry NaN, so check before converting.
    """
    import torch

    if isinstance(image_tensor, torch.Tensor):
        return not bool(torch.isfinite(image_tensor).all())
    import numpy as np

    return not bool(np.isfinite(np.asarray(image_tensor)).all())
