"""ControlNet model files in ``models/ControlNet``: finding, listing and loading them.

Models come as single files in the original ``cldm`` layout (keys ``control_model.*`` or
unprefixed, e.g. ``control_v11p_sd15_canny.safetensors``) and diffusers folders (``config.json`` +
weights). Single files carry no config, so the architecture is read off the tensor shapes; the
attention head count, which shapes do not reveal, comes from a sidecar ``<name>.yaml`` (the
extension's ``cldm_v15.yaml``/``cldm_v21.yaml`` style) or the family's standard value. Nothing is
downloaded. Loaded models live in a :class:`ControlNetCache` owned by the engine.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import (
    CheckpointLoadError,
    ControlNetError,
    ControlNetFamilyError,
    ControlNetNotFoundError,
)
from pipelines.models.weight_files import read_state_dict

if TYPE_CHECKING:
    import torch

    from pipelines.models.families import ModelFamily

log = logging.getLogger(__name__)

CONTROLNET_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
ANNOTATOR_FOLDER = "annotators"
"""Subfolder of ``models/ControlNet`` for preprocessor (annotator) weights; never listed as models."""


_BASE_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
_CONTEXT_WIDTH_BASES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _is_diffusers_controlnet(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "ControlNet" in str(data.get("_class_name", ""))


def list_controlnet_paths(controlnet_dir: Path) -> list[Path]:
    """ControlNet files and diffusers folders under ``controlnet_dir`` (not the annotators folder,
    not the files inside a diffusers folder), sorted by name as the extension sorts them."""
    if not controlnet_dir.is_dir():
        return []
    found: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if folder == controlnet_dir and entry.name.lower() == ANNOTATOR_FOLDER:
                    continue
                if _is_diffusers_controlnet(entry):
                    found.append(entry)
                else:
                    walk(entry)
            elif entry.suffix.lower() in CONTROLNET_SUFFIXES:
                found.append(entry)

    walk(controlnet_dir)
    return sorted(found, key=lambda p: p.name.lower())


def _model_stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return None


def legacy_model_hash(path: Path) -> str:
    """A1111's old short model hash (sha256 of 64 KiB at offset 1 MiB, 8 hex digits), which the
    extension shows after ControlNet model names: ``control_v11p_sd15_canny [d14c016b]``."""
    weights = _weights_file(path)
    if weights is None:
        return "00000000"
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]


def model_title(path: Path) -> str:
    return f"{_model_stem(path)} [{legacy_model_hash(path)}]"


def model_catalogue(controlnet_dir: Path) -> dict[str, list[str]]:
    """The extension's ``GET /controlnet/model_list``: ``{"model_list": ["name [hash]", ...]}``."""
    return {"model_list": [model_title(path) for path in list_controlnet_paths(controlnet_dir)]}


def find_controlnet(controlnet_dir: Path, name: str) -> Path:
    """Resolve a unit's ``model`` (``name``, ``name [hash]``, a file name or ``sub/name``)."""
    paths = list_controlnet_paths(controlnet_dir)
    wanted = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", name.strip()).replace("\\", "/")
    for suffix in CONTROLNET_SUFFIXES:
        if wanted.lower().endswith(suffix):
            wanted = wanted[: -len(suffix)]
            break

    def relative(path: Path) -> str:
        rel = path.relative_to(controlnet_dir)
        return rel.as_posix() if path.is_dir() else rel.with_suffix("").as_posix()

    for exact in (True, False):
        for path in paths:
            candidates = (_model_stem(path), relative(path))
            if any(c == wanted if exact else c.lower() == wanted.lower() for c in candidates):
                return path
    stems = [_model_stem(p) for p in paths]
    close = difflib.get_close_matches(wanted, stems, n=5, cutoff=0.5)
    hint = (
        f"Close names: {', '.join(close)}."
        if close
        else (
            f"Available: {', '.join(stems[:15])}."
            if stems
            else f"{controlnet_dir} has no ControlNet models yet."
        )
    )
    raise ControlNetNotFoundError(
        f"ControlNet model '{name}' not found in {controlnet_dir}. {hint} Put the .safetensors file (or "
        "diffusers folder) there."
    )


# ============================================================================================
# Loading
# ============================================================================================


@dataclass
class LoadedControlNet:
    """A ControlNet in memory with the family it was made for."""

    name: str
    path: Path
    model: Any  # diffusers ControlNetModel
    base: str  # "sd1" | "sd2" | "sdxl"

    @property
    def family_label(self) -> str:
        return _BASE_LABELS.get(self.base, self.base)


def base_from_config(config: Mapping[str, Any]) -> str:
    """Which model family a ControlNet config belongs to: SDXL ones have the ``text_time``
    addition embedding (or 2048-wide context); SD2's are 1024-wide with linear projections; SD1's
    768-wide. Unusual widths (tiny test models) fall back to the structural signs."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = config.get("cross_attention_dim")
    if isinstance(width, int) and width in _CONTEXT_WIDTH_BASES:
        return _CONTEXT_WIDTH_BASES[width]
    return "sd2" if config.get("use_linear_projection") else "sd1"


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "control_model."
    if any(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return dict(state_dict)


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state_dict if (m := regex.match(key))})


def _yaml_control_params(original_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if not original_config:
        return {}
    params = ((original_config.get("model") or {}).get("params") or {}).get("control_stage_config") or {}
    return dict(params.get("params") or {})


def controlnet_config_from_ldm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    original_config: Mapping[str, Any] | None = None,
    name: str = "controlnet",
) -> dict[str, Any]:
    """A diffusers ``ControlNetModel`` config for an original-layout (``cldm``) state dict.

    Sizes come from the tensor shapes. Attention heads are invisible in the weights: a sidecar
    yaml's ``num_heads``/``num_head_channels`` decides, else the family default (8 heads for SD1,
    64-channel heads for SD2/SDXL).
    """
    sd = state_dict
    if "input_hint_block.0.weight" not in sd or "time_embed.0.weight" not in sd:
        raise CheckpointLoadError(
            f"{name}: not an original-layout ControlNet (no input_hint_block / time_embed)."
        )
    hint = _indices(sd, r"input_hint_block\.(\d+)\.weight$")
    blocks = _indices(sd, r"input_blocks\.(\d+)\.")
    downsamplers = _indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight$")
    levels = len(downsamplers) + 1
    layers_per_block = (len(blocks) - 1 - len(downsamplers)) // levels
    block_out: list[int] = []
    down_types: list[str] = []
    depths: list[int] = []
    index = 1
    for level in range(levels):
        first = index
        block_out.append(int(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        has_attention = f"input_blocks.{first}.1.proj_in.weight" in sd
        down_types.append("CrossAttnDownBlock2D" if has_attention else "DownBlock2D")
        depths.append(len(_indices(sd, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) or 1)
        index += layers_per_block + (1 if level < levels - 1 else 0)
    attention_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
    if not attention_keys:
        raise CheckpointLoadError(f"{name}: ControlNet without cross-attention layers is not supported.")
    context_dim = int(sd[attention_keys[0]].shape[1])
    linear = sd[next(k for k in sd if k.endswith("1.proj_in.weight"))].ndim == 2
    mid_depth = len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    transformer_depths = [*depths[:-1], mid_depth or depths[-1]] if mid_depth else depths
    conditioning = [int(sd[f"input_hint_block.{hint[0]}.weight"].shape[0])] + [
        int(sd[f"input_hint_block.{hint[i]}.weight"].shape[0]) for i in range(2, len(hint) - 1, 2)
    ]
    addition: dict[str, Any] = {}
    if "label_emb.0.0.weight" in sd:
        addition = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": int(sd["label_emb.0.0.weight"].shape[1]),
        }
    config: dict[str, Any] = {
        "in_channels": int(sd["input_blocks.0.0.weight"].shape[1]),
        "conditioning_channels": int(sd["input_hint_block.0.weight"].shape[1]),
        "down_block_types": down_types,
        "block_out_channels": block_out,
        "layers_per_block": layers_per_block,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": transformer_depths,
        "use_linear_projection": linear,
        "conditioning_embedding_out_channels": conditioning,
        "norm_num_groups": 32,
        **addition,
    }
    base = base_from_config(config)
    params = _yaml_control_params(original_config)
    heads = params.get("num_heads", -1)
    head_channels = params.get("num_head_channels", -1)
    if isinstance(heads, int) and heads > 0:
        config["attention_head_dim"] = heads
    elif isinstance(head_channels, int) and head_channels > 0:
        config["attention_head_dim"] = [max(1, c // head_channels) for c in block_out]
    elif base == "sd1":
        config["attention_head_dim"] = 8
    else:
        config["attention_head_dim"] = [max(1, c // 64) for c in block_out]
    config["global_pool_conditions"] = (
        bool(params.get("global_average_pooling", False)) or "shuffle" in name.lower()
    )
    return config


def _convert_ldm_controlnet(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Original keys -> diffusers keys: diffusers' converter for the encoder, our own mapping for
    the hint (conditioning) encoder, whose conv_out diffusers assumes to be at index 14 (true for
    the standard four-stage encoder only), and for SDXL's ``label_emb``."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(dict(sd), {"layers_per_block": config["layers_per_block"]})
    result = {
        key: value
        for key, value in converted.items()
        if value is not None and not key.startswith("controlnet_cond_embedding.")
    }
    hint = _indices(sd, r"input_hint_block\.(\d+)\.weight$")
    targets = ["conv_in"] + [f"blocks.{i}" for i in range(len(hint) - 2)] + ["conv_out"]
    for index, target in zip(hint, targets, strict=True):
        for kind in ("weight", "bias"):
            result[f"controlnet_cond_embedding.{target}.{kind}"] = sd[f"input_hint_block.{index}.{kind}"]
    for source, target in (
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
    ):
        for kind in ("weight", "bias"):
            if f"{source}.{kind}" in sd:
                result[f"{target}.{kind}"] = sd[f"{source}.{kind}"]
    return result


def _read_sidecar_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    try:
        data = yaml.safe_load(sidecar.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ControlNetError(f"{sidecar.name}: cannot read this yaml config ({exc}).") from exc
    return data if isinstance(data, dict) else None


def load_controlnet_file(path: Path) -> tuple[Any, str]:
    """Load a single-file ControlNet in the original layout; returns ``(ControlNetModel, base)``."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    try:
        raw = read_state_dict(path)
    except CheckpointLoadError as exc:
        raise ControlNetError(f"ControlNet {exc}") from exc
    sd = _strip_prefix(raw)
    if "input_hint_block.0.weight" not in sd:
        if "controlnet_cond_embedding.conv_in.weight" in sd:
            reason = (
                "it holds diffusers-format weights without their config; put it in a folder together with "
                "its config.json (a diffusers ControlNet folder)"
            )
        elif any("lora" in key for key in sd):
            reason = "it looks like a Control-LoRA, which is not supported yet"
        else:
            reason = (
                "it is not a ControlNet (T2I-Adapters, IP-Adapters and ControlLLLite are not supported yet)"
            )
        raise ControlNetError(f"ControlNet {path.name} cannot be loaded: {reason}.")
    try:
        config = controlnet_config_from_ldm(sd, original_config=_read_sidecar_yaml(path), name=path.stem)
        converted = _convert_ldm_controlnet(sd, config)
    except (KeyError, IndexError, StopIteration, CheckpointLoadError) as exc:
        raise ControlNetError(
            f"ControlNet {path.name}: unrecognised layout ({type(exc).__name__}: {exc}). It may be damaged "
            "or a model type SD Studio does not support yet."
        ) from exc
    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            (missing and f"missing {missing[:3]}")
            or (unexpected and f"unexpected {unexpected[:3]}")
            or (f"wrong shape {wrong[:3]}")
        )
        raise ControlNetError(
            f"ControlNet {path.name}: the weights do not form a standard ControlNet ({detail}). Add the "
            "matching .yaml config next to it, or use a diffusers-format folder."
        )
    model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True, assign=True)
    model.eval()
    return model, base_from_config(config)


def load_controlnet_folder(path: Path) -> tuple[Any, str]:
    """Load a diffusers ControlNet folder (offline); returns ``(ControlNetModel, base)``."""
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ControlNetError(f"ControlNet folder {path.name}: cannot load it ({exc}).") from exc
    model.eval()
    return model, base_from_config(dict(model.config))


def load_controlnet(path: Path) -> LoadedControlNet:
    model, base = load_controlnet_folder(path) if path.is_dir() else load_controlnet_file(path)
    return LoadedControlNet(name=_model_stem(path), path=path, model=model, base=base)


def family_base(family: ModelFamily | str) -> str:
    return family if isinstance(family, str) else family.base


def check_controlnet_family(loaded: LoadedControlNet, family: ModelFamily | str) -> None:
    """Raise :class:`ControlNetFamilyError` when the ControlNet does not fit the checkpoint."""
    base = family_base(family)
    if loaded.base != base:
        checkpoint = family.label if not isinstance(family, str) else _BASE_LABELS.get(base, base)
        raise ControlNetFamilyError(
            f"ControlNet {loaded.name} is for {loaded.family_label} but the loaded checkpoint is "
            f"{checkpoint}. Pick a ControlNet made for {checkpoint} (or switch the checkpoint)."
        )


class ControlNetCache:
    """Loaded ControlNet models, least recently used dropped first. One per engine (no globals);
    thread-safe. ``capacity`` counts models (an SD1.5 ControlNet is ~0.7 GB in fp16, SDXL ~2.5 GB)."""

    def __init__(self, controlnet_dir: Path, *, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError("ControlNetCache capacity must be at least 1.")
        self.controlnet_dir = controlnet_dir
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, int], LoadedControlNet] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._models)

    def find(self, name: str) -> Path:
        return find_controlnet(self.controlnet_dir, name)

    def get(self, name: str, *, device: Any = None, dtype: Any = None) -> LoadedControlNet:
        """The named model, loaded on first use and moved to ``device``/``dtype`` when given."""
        path = self.find(name)
        stamp = (path / "config.json") if path.is_dir() else path
        key = (str(path.resolve()), stamp.stat().st_mtime_ns)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                self._models.move_to_end(key)
        if loaded is None:
            loaded = load_controlnet(path)
            log.info("loaded ControlNet %s (%s)", loaded.name, loaded.family_label)
            with self._lock:
                self._models[key] = loaded
                self._models.move_to_end(key)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
        if device is not None or dtype is not None:
            loaded.model.to(device=device, dtype=dtype)
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
