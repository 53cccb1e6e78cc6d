"""A1111 extra networks on a diffusers pipeline: LoRA (``<lora:...>``) and textual inversion.

LoRA
    ``<lora:name>``, ``<lora:name:weight>`` and ``<lora:name:te_weight:unet_weight>`` (also the named
    forms ``te=``/``unet=``) mean what they mean in A1111's ``extensions-builtin/Lora``: the first
    number scales the text-encoder part, the second the UNet part and defaults to the first.
    ``<lyco:...>`` is an alias. Files are found in ``models/Lora`` (subfolders too) by file stem,
    case-insensitively, or by the ``ss_output_name`` alias kohya writes into the metadata.
    Loading goes through diffusers' PEFT integration, which converts kohya (``lora_unet_*``,
    ``lora_te_*``, ``lora_te1_/te2_`` for SDXL) and diffusers/PEFT layouts. LoRAs are never fused
    into the weights: :func:`remove_loras` takes the PEFT layers out again, so the next job runs on
    exactly the original modules (bit-identical output).

Textual inversion
    A1111 has no tag for embeddings: a word in the prompt that equals an embedding's file stem
    *is* the embedding. :func:`load_embeddings_for_prompt` registers the embeddings the prompts
    mention as extra tokenizer tokens (one per vector: ``name``, ``name_1``, ...) and writes their
    vectors into the text encoder(s); diffusers' ``maybe_convert_prompt`` (called by
    :mod:`pipelines.prompts.encoding` per prompt fragment) then expands ``name`` into all its vectors.
    :func:`unload_embeddings` undoes it after the job.

The engine's order per job: ``apply_loras`` and ``load_embeddings_for_prompt`` before encoding the
prompts, ``remove_loras`` and ``unload_embeddings`` (in ``finally``) after decoding.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import CheckpointLoadError, ModelNotFoundError, StudioError
from pipelines.models.safetensors_header import read_safetensors_header
from pipelines.models.weight_files import read_state_dict
from pipelines.prompts.parser import ExtraNetworkRef, strip_extra_networks

if TYPE_CHECKING:
    import torch

    from pipelines.models.families import ModelFamily

log = logging.getLogger(__name__)

LORA_KINDS = ("lora", "lyco")
"""Tag kinds handled as LoRA (A1111 registers ``lyco`` as an alias of ``lora``)."""
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
LORA_HASHES_KEY = "Lora hashes"
"""The infotext parameter name for :func:`lora_hashes`."""
LORA_SHORT_HASH_LENGTH = 12

_ADAPTER_PREFIX = "sdstudio"
_HASH_CHUNK = 1024 * 1024
# Cross-attention context width and text-encoder width of each base family.
_CONTEXT_WIDTH_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_TEXT_WIDTH_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL"}


class LoraError(StudioError):
    """A LoRA tag cannot be applied (missing file, wrong model family, unreadable file)."""


class LoraNotFoundError(LoraError, ModelNotFoundError):
    """No file in ``models/Lora`` matches the name in a ``<lora:...>`` tag."""


class EmbeddingError(StudioError):
    """An embedding file cannot be read or registered."""


# ============================================================================================
# LoRA
# ============================================================================================


@dataclass(frozen=True)
class LoraRequest:
    """One ``<lora:...>`` tag, its numbers parsed as A1111 does."""

    mentioned_name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


@dataclass
class AppliedLora:
    """A LoRA placed on the pipeline for one job."""

    mentioned_name: str
    path: Path
    te_weight: float
    unet_weight: float
    adapter_name: str | None
    """``None`` when both weights are 0: nothing was loaded (a no-op, but still listed in the
    infotext hashes as A1111 does)."""
    sha256: str = ""
    """A1111's LoRA hash: sha256 of the tensor data after the header for ``.safetensors``
    (kohya's "addnet" hash), of the whole file otherwise."""

    @property
    def short_hash(self) -> str:
        return self.sha256[:LORA_SHORT_HASH_LENGTH]


@dataclass
class AppliedNetworks:
    """What :func:`apply_loras` did; hand it to :func:`remove_loras` and :func:`lora_hashes`."""

    loras: list[AppliedLora] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def adapter_names(self) -> list[str]:
        return [lora.adapter_name for lora in self.loras if lora.adapter_name]

    def __bool__(self) -> bool:
        return bool(self.loras)


def parse_lora_ref(ref: ExtraNetworkRef) -> LoraRequest:
    """``<lora:name:te:unet>`` -> weights; positional numbers first, ``te=``/``unet=`` override.

    A fourth positional number or ``dyn=`` (A1111's dynamic-rank option) is accepted and ignored.
    """
    positional = [arg.strip() for arg in ref.args if "=" not in arg]
    named = {
        key.strip().lower(): value.strip()
        for key, _, value in (arg.partition("=") for arg in ref.args if "=" in arg)
    }
    tag = f"<{ref.kind}:{ref.name}{''.join(':' + a for a in ref.args)}>"

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise LoraError(
                f"{tag}: '{text}' is not a number. Write the weight as a number, e.g. <lora:{ref.name}:0.8>."
            ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise LoraError(f"{tag}: the weight must be a finite number.")
        return value

    te_weight = number(positional[0]) if positional and positional[0] else 1.0
    te_weight = number(named["te"]) if "te" in named else te_weight
    unet_weight = number(positional[1]) if len(positional) > 1 and positional[1] else te_weight
    unet_weight = number(named["unet"]) if "unet" in named else unet_weight
    return LoraRequest(mentioned_name=ref.name.strip(), te_weight=te_weight, unet_weight=unet_weight)


# --- finding files -----------------------------------------------------------------------------


def _iter_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and path.suffix.lower() in suffixes:
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix().lower())


def read_safetensors_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a ``.safetensors`` file; values that hold JSON objects/lists (kohya's
    ``ss_tag_frequency``...) are decoded, as A1111 does. Unreadable files give ``{}``."""
    try:
        raw = read_safetensors_header(path).metadata
    except CheckpointLoadError:
        return {}
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and value[:1] in ("{", "["):
            try:
                metadata[key] = json.loads(value)
                continue
            except ValueError:
                pass
        metadata[key] = value
    return metadata


def _lora_alias(path: Path) -> str:
    if path.suffix.lower() != ".safetensors":
        return path.stem
    alias = read_safetensors_metadata(path).get("ss_output_name")
    return str(alias) if alias else path.stem


def find_lora_file(lora_dir: Path, name: str) -> Path:
    """Resolve the name in a tag to a file: exact stem, then case-insensitive stem (a ``sub/name``
    path works too), then the kohya ``ss_output_name`` alias. Raises :class:`LoraNotFoundError`
    naming the expected file and the closest names on disk."""
    files = _iter_files(lora_dir, LORA_SUFFIXES)
    wanted = name.strip().replace("\\", "/")
    for suffix in LORA_SUFFIXES:
        if wanted.lower().endswith(suffix):
            wanted = wanted[: -len(suffix)]
            break

    def relative_stem(path: Path) -> str:
        return path.relative_to(lora_dir).with_suffix("").as_posix()

    matchers = (
        lambda p: p.stem == wanted or relative_stem(p) == wanted,
        lambda p: p.stem.lower() == wanted.lower() or relative_stem(p).lower() == wanted.lower(),
    )
    for matcher in matchers:
        matches = [p for p in files if matcher(p)]
        if matches:
            # .safetensors first: it is what A1111 users are told to prefer.
            matches.sort(key=lambda p: p.suffix.lower() != ".safetensors")
            return matches[0]
    for path in files:
        if _lora_alias(path).lower() == wanted.lower():
            return path

    stems = sorted({p.stem for p in files}, key=str.lower)
    close = difflib.get_close_matches(wanted.lower(), [s.lower() for s in stems], n=5, cutoff=0.5)
    by_lower = {s.lower(): s for s in stems}
    if close:
        hint = "Close names: " + ", ".join(by_lower[c] for c in close) + "."
    elif stems:
        hint = "Available: " + ", ".join(stems[:15]) + (" ..." if len(stems) > 15 else "") + "."
    else:
        hint = f"{lora_dir} has no LoRA files yet."
    raise LoraNotFoundError(
        f"LoRA '{name}' not found: expected {lora_dir / wanted}.safetensors (subfolders are searched "
        f"too). {hint} Put the file there or fix the name in <lora:{name}:...>."
    )


# --- hashes ---------------------------------------------------------------------------------------


def lora_file_hash(path: Path) -> str:
    """A1111's LoRA hash (full hex): kohya's "addnet" hash for ``.safetensors`` (sha256 of the
    tensor bytes after the JSON header, so editing metadata keeps the hash), the whole file's
    sha256 for pickled files."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if path.suffix.lower() == ".safetensors":
            prefix = handle.read(8)
            if len(prefix) == 8:
                (header_length,) = struct.unpack("<Q", prefix)
                handle.seek(8 + header_length)
            else:
                handle.seek(0)
        for block in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_lora_hash(path: Path, hash_cache: MutableMapping[tuple[str, int, float], str] | None) -> str:
    if path.suffix.lower() == ".safetensors":
        # kohya's trainer stores the same hash in the metadata; A1111 trusts it first.
        stored = read_safetensors_metadata(path).get("sshs_model_hash")
        if isinstance(stored, str) and re.fullmatch(r"[0-9a-fA-F]{12,64}", stored):
            return stored.lower()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime)
    if hash_cache is not None and key in hash_cache:
        return hash_cache[key]
    value = lora_file_hash(path)
    if hash_cache is not None:
        hash_cache[key] = value
    return value


def lora_hashes(applied: AppliedNetworks) -> str:
    """The value of A1111's ``Lora hashes`` infotext parameter: ``name: 0123456789ab, name2: ...``
    (names as written in the prompt, with ``:`` and ``,`` removed; first 12 hex digits). Put it in
    the infotext parameters under :data:`LORA_HASHES_KEY`; ``build_infotext`` quotes it. Empty when
    no LoRA was applied."""
    parts: list[str] = []
    seen: set[str] = set()
    for lora in applied.loras:
        alias = lora.mentioned_name.replace(":", "").replace(",", "")
        if not alias or not lora.short_hash or alias in seen:
            continue
        seen.add(alias)
        parts.append(f"{alias}: {lora.short_hash}")
    return ", ".join(parts)


# --- listing --------------------------------------------------------------------------------------


def list_loras(lora_dir: Path) -> list[dict[str, Any]]:
    """A1111's ``GET /sdapi/v1/loras``: ``[{"name", "alias", "path", "metadata"}]`` (headers only,
    no tensor data is read)."""
    entries = []
    for path in _iter_files(lora_dir, LORA_SUFFIXES):
        metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
        alias = metadata.get("ss_output_name") or path.stem
        entries.append({"name": path.stem, "alias": str(alias), "path": str(path), "metadata": metadata})
    return entries


def lora_family_label(path: Path) -> str:
    """The model family a LoRA file was trained for ("SD1.x", "SD2.x", "SDXL"...), from the tensor
    shapes in its safetensors header (no tensor data is read); "unknown" for pickled files, whose
    shapes cannot be read without loading them."""
    from types import SimpleNamespace

    if path.suffix.lower() != ".safetensors":
        return "unknown"
    try:
        header = read_safetensors_header(path)
    except CheckpointLoadError:
        return "unknown"
    shapes = {
        name: SimpleNamespace(ndim=len(info.shape), shape=info.shape) for name, info in header.tensors.items()
    }
    return _lora_family_label(_lora_widths(shapes), read_safetensors_metadata(path))  # type: ignore[arg-type]


# --- family checks -------------------------------------------------------------------------------


def _pipeline_label(pipe: Any, family: ModelFamily | None) -> str:
    if family is not None:
        return family.label
    width = getattr(pipe.unet.config, "cross_attention_dim", None)
    if isinstance(width, int) and width in _CONTEXT_WIDTH_FAMILIES:
        return _CONTEXT_WIDTH_FAMILIES[width]
    return f"a model with {width}-wide text conditioning"


def _is_down_weight(key: str) -> bool:
    return any(marker in key for marker in ("lora_down.", "lora_A.", ".down.", "lora.down."))


def _lora_widths(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """What the LoRA was trained against, read from its down-projection shapes: the UNet's
    cross-attention context width and the text encoders' hidden widths."""
    widths: dict[str, int] = {}
    for key, tensor in state_dict.items():
        if not _is_down_weight(key) or tensor.ndim != 2:
            continue
        flat = key.replace(".", "_")
        if "attn2" in flat and ("to_k" in flat or "to_v" in flat) and "unet" in flat:
            widths.setdefault("context", int(tensor.shape[1]))
        elif "q_proj" in flat or "k_proj" in flat:
            if flat.startswith(("lora_te2_", "text_encoder_2_")):
                widths.setdefault("text_encoder_2", int(tensor.shape[1]))
            elif flat.startswith(("lora_te_", "lora_te1_", "text_encoder_")):
                widths.setdefault("text_encoder", int(tensor.shape[1]))
    return widths


def _lora_family_label(widths: Mapping[str, int], metadata: Mapping[str, Any]) -> str:
    if "text_encoder_2" in widths or widths.get("context") == 2048:
        return "SDXL"
    base = str(metadata.get("ss_base_model_version", ""))
    if base.startswith("sdxl") or "xl" in str(metadata.get("modelspec.architecture", "")):
        return "SDXL"
    if widths.get("context") == 1024 or widths.get("text_encoder") == 1024 or metadata.get("ss_v2") == "True":
        return "SD2.x"
    if widths.get("context") == 768 or widths.get("text_encoder") == 768:
        return "SD1.x"
    context = widths.get("context")
    return f"a model with {context}-wide text conditioning" if context else "another model type"


def check_lora_family(
    pipe: Any,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str,
    family: ModelFamily | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a LoRA made for another model family before any weight is touched, so the user sees
    "is for SDXL but the loaded checkpoint is SD1.x" instead of a tensor-shape traceback."""
    widths = _lora_widths(state_dict)
    expected: dict[str, int | None] = {"context": getattr(pipe.unet.config, "cross_attention_dim", None)}
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component, None)
        expected[component] = encoder.get_input_embeddings().weight.shape[1] if encoder is not None else None
    mismatched = [
        part
        for part, width in widths.items()
        if expected.get(part) is None or (isinstance(expected[part], int) and expected[part] != width)
    ]
    if not mismatched:
        return
    lora_label = _lora_family_label(widths, metadata or {})
    model_label = _pipeline_label(pipe, family)
    if lora_label == model_label:  # same family name, different sizes: describe the sizes
        details = ", ".join(f"{part} {widths[part]} vs {expected.get(part)}" for part in mismatched)
        lora_label = f"a differently sized model ({details})"
    raise LoraError(
        f"LoRA '{name}' is for {lora_label} but the loaded checkpoint is {model_label}. "
        f"Use a LoRA made for {model_label}, or switch to a matching checkpoint."
    )


# --- loading --------------------------------------------------------------------------------------

_TE_OLD_TO_NEW = {
    ".to_q_lora.": ".q_proj.lora_linear_layer.",
    ".to_k_lora.": ".k_proj.lora_linear_layer.",
    ".to_v_lora.": ".v_proj.lora_linear_layer.",
    ".to_out_lora.": ".out_proj.lora_linear_layer.",
}


def _prepare_lora_state_dict(pipe: Any, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert to diffusers' layout and fold kohya's ``alpha`` into the up-projections.

    Two diffusers 0.42 gaps are closed here: a kohya text-encoder LoRA that touches only some of
    q/k/v/out is converted to an "old diffusers" layout that diffusers then fails to recognise
    (we rename it to the current ``lora_linear_layer`` layout), and per-module alphas are
    matched to modules by name patterns that break on transformers 5's flattened CLIP. Folding
    ``alpha / rank`` into the up weights makes every module's scale exact without either.
    """
    state_dict, alphas = pipe.lora_state_dict(dict(raw), unet_config=pipe.unet.config)
    state_dict = dict(state_dict)
    for key, alpha in (alphas or {}).items():
        down_key = key.removesuffix(".alpha")
        up_key = down_key.replace(".down.", ".up.").replace("lora_A", "lora_B")
        down, up = state_dict.get(down_key), state_dict.get(up_key)
        if down is None or up is None:
            continue
        rank = down.shape[0]
        state_dict[up_key] = up * (float(alpha) / rank)
    fixed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("text_encoder"):
            for old, new in _TE_OLD_TO_NEW.items():
                key = key.replace(old, new)
        fixed[key] = tensor
    return fixed


def _adapter_name(index: int, path: Path) -> str:
    # PEFT keeps adapters in ModuleDicts: no dots, keep it short and recognisable in logs.
    safe = re.sub(r"[^0-9A-Za-z_]", "_", path.stem)[:40]
    return f"{_ADAPTER_PREFIX}_{index}_{safe}"


def _read_lora(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except CheckpointLoadError as exc:
        raise LoraError(f"LoRA {path.name}: {exc}") from exc


def _components_with_adapter(pipe: Any, adapter: str) -> list[str]:
    return [component for component, names in pipe.get_list_adapters().items() if adapter in names]


def apply_loras(
    pipe: Any,
    refs: Iterable[ExtraNetworkRef],
    *,
    lora_dir: Path,
    family: ModelFamily | None = None,
    hash_cache: MutableMapping[tuple[str, int, float], str] | None = None,
) -> AppliedNetworks:
    """Load the LoRAs named by ``<lora:...>``/``<lyco:...>`` tags onto ``pipe`` with their weights.

    ``refs`` is what :func:`pipelines.prompts.parser.strip_extra_networks` returned; other tag
    kinds are skipped with a note. Each tag becomes its own PEFT adapter; all of them are active
    together. ``family`` only improves error messages. ``hash_cache`` (any dict the caller keeps)
    saves re-hashing unchanged files on later jobs. On any error, LoRAs already loaded by this
    call are removed again before the exception propagates, so the pipeline is left clean.

    Raises :class:`LoraNotFoundError` for a missing file and :class:`LoraError` for an unreadable
    file, a LoRA for another model family or a LoRA type diffusers cannot load (LoHa, LoKr...).
    """
    applied = AppliedNetworks()
    existing = {name for names in pipe.get_list_adapters().values() for name in names}
    try:
        for index, ref in enumerate(refs):
            if ref.kind.lower() not in LORA_KINDS:
                applied.notes.append(f"<{ref.kind}:{ref.name}> is not supported and was ignored")
                continue
            request = parse_lora_ref(ref)
            path = find_lora_file(lora_dir, request.mentioned_name)
            lora = AppliedLora(
                mentioned_name=request.mentioned_name,
                path=path,
                te_weight=request.te_weight,
                unet_weight=request.unet_weight,
                adapter_name=None,
                sha256=_cached_lora_hash(path, hash_cache),
            )
            applied.loras.append(lora)
            if request.te_weight == 0 and request.unet_weight == 0:
                continue
            raw = _read_lora(path)
            metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
            check_lora_family(pipe, raw, name=request.mentioned_name, family=family, metadata=metadata)
            adapter = _adapter_name(index, path)
            while adapter in existing:
                adapter += "_"
            _load_adapter(pipe, raw, adapter, path)
            lora.adapter_name = adapter
            existing.add(adapter)
        _activate(pipe, applied)
    except BaseException:
        remove_loras(pipe, applied)
        raise
    return applied


@contextmanager
def _quiet_adapter_loading() -> Iterator[None]:
    """Hide transformers' per-load progress bar and its "LOAD REPORT", which (transformers 5.23)
    lists the *other* adapters already on the text encoder as "MISSING" when a second LoRA is
    loaded, and PEFT's "multiple adapters" warning: misleading noise in the console. The logger
    level and progress-bar switch are restored afterwards."""
    from transformers.utils import logging as transformers_logging

    report_logger = logging.getLogger("transformers.integrations.peft")
    previous_level = report_logger.level
    bars_enabled = transformers_logging.is_progress_bar_enabled()
    report_logger.setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # Several adapters at once is the point here, not an accident.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        report_logger.setLevel(previous_level)
        if bars_enabled:
            transformers_logging.enable_progress_bar()


def _load_adapter(pipe: Any, raw: dict[str, torch.Tensor], adapter: str, path: Path) -> None:
    try:
        state_dict = _prepare_lora_state_dict(pipe, raw)
        with _quiet_adapter_loading():
            pipe.load_lora_weights(state_dict, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        _delete_adapter_quietly(pipe, adapter)
        raise LoraError(
            f"LoRA {path.name} cannot be loaded on this model ({type(exc).__name__}: {str(exc)[:300]}). "
            "Standard LoRA/LoCon files work; LoHa, LoKr and other LyCORIS types are not supported yet."
        ) from exc
    if not _components_with_adapter(pipe, adapter):
        raise LoraError(
            f"LoRA {path.name} has no layers that match this model, so it would change nothing. "
            "It is probably made for another model family."
        )


def _delete_adapter_quietly(pipe: Any, adapter: str) -> None:
    if _components_with_adapter(pipe, adapter):
        pipe.delete_adapters([adapter])


def _activate(pipe: Any, applied: AppliedNetworks) -> None:
    """Make exactly this job's adapters active, each part with its own weight."""
    loaded = [lora for lora in applied.loras if lora.adapter_name]
    if not loaded:
        return
    names: list[str] = []
    weights: list[dict[str, float]] = []
    for lora in loaded:
        assert lora.adapter_name is not None
        components = _components_with_adapter(pipe, lora.adapter_name)
        names.append(lora.adapter_name)
        weights.append(
            {
                component: lora.unet_weight if component == "unet" else lora.te_weight
                for component in components
            }
        )
    pipe.set_adapters(names, adapter_weights=weights)


def remove_loras(pipe: Any, applied: AppliedNetworks) -> None:
    """Take this job's LoRAs off the pipeline. When no adapter is left, the PEFT wrapper layers are
    removed too, so the modules are the original ones again (bit-identical output)."""
    names = [name for name in applied.adapter_names if _components_with_adapter(pipe, name)]
    for lora in applied.loras:
        lora.adapter_name = None
    if not names:
        return
    pipe.delete_adapters(names)
    if not any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()


# ============================================================================================
# Textual inversion
# ============================================================================================


@dataclass(frozen=True)
class Embedding:
    """One embedding file's vectors. ``vectors`` maps the text encoder they belong to: ``clip_l``
    and ``clip_g`` for SDXL files, ``""`` for single-encoder (SD1/SD2) files."""

    name: str
    path: Path
    vectors: Mapping[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def vector_count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def width(self) -> int:
        """A1111's ``shape``: the vector width, summed over encoders for SDXL (768 + 1280 = 2048)."""
        return sum(int(t.shape[-1]) for t in self.vectors.values())


def _as_matrix(tensor: Any, path: Path) -> torch.Tensor:
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2):
        raise EmbeddingError(f"Embedding {path.name}: expected a vector or a matrix of vectors.")
    tensor = tensor.detach().to(torch.float32)
    return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor


def _embedding_from_data(data: Any, path: Path) -> Embedding:
    import torch

    def meta(key: str) -> Any:
        return data.get(key) if isinstance(data, dict) else None

    vectors: dict[str, torch.Tensor]
    if isinstance(data, torch.Tensor):
        vectors = {"": _as_matrix(data, path)}
    elif not isinstance(data, dict):
        raise EmbeddingError(f"Embedding {path.name}: unknown format (not a dictionary of tensors).")
    elif "string_to_param" in data:  # A1111 / original textual-inversion training
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(
                f"Embedding {path.name}: 'string_to_param' must hold exactly one tensor. If the file is an "
                "old PyTorch pickle, convert it to .safetensors."
            )
        vectors = {"": _as_matrix(next(iter(params.values())), path)}
    elif "clip_l" in data and "clip_g" in data:  # SDXL
        vectors = {"clip_l": _as_matrix(data["clip_l"], path), "clip_g": _as_matrix(data["clip_g"], path)}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingError(f"Embedding {path.name}: clip_l and clip_g have different vector counts.")
    elif "emb_params" in data:
        vectors = {"": _as_matrix(data["emb_params"], path)}
    else:
        tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
        if len(tensors) != 1:
            raise EmbeddingError(
                f"Embedding {path.name}: unknown format (expected 'string_to_param', 'emb_params', "
                "'clip_l'+'clip_g', or a single token tensor)."
            )
        vectors = {"": _as_matrix(tensors[0], path)}
    step = meta("step")
    return Embedding(
        name=path.stem,
        path=path,
        vectors=vectors,
        step=int(step) if isinstance(step, int) else None,
        sd_checkpoint=str(meta("sd_checkpoint")) if meta("sd_checkpoint") is not None else None,
        sd_checkpoint_name=str(meta("sd_checkpoint_name"))
        if meta("sd_checkpoint_name") is not None
        else None,
    )


def read_embedding(path: Path) -> Embedding:
    """Read an A1111 (``.pt``/``.safetensors`` with ``string_to_param``/``emb_params``, SDXL
    ``clip_l``+``clip_g``) or diffusers (``learned_embeds``: ``{token: tensor}``) embedding.
    Pickles go through ``torch.load(weights_only=True)`` only."""
    import pickle

    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise EmbeddingError(
                f"Embedding {path.name}: file is corrupt ({exc}). Download it again."
            ) from exc
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
            raise EmbeddingError(
                f"Embedding {path.name}: refused or unreadable ({str(exc)[:200]}). Only pickles holding "
                "plain tensors are loaded, since others could run code; use a .safetensors version."
            ) from exc
    return _embedding_from_data(data, path)


def list_embeddings(embeddings_dir: Path, *, expected_width: int | None = None) -> dict[str, Any]:
    """A1111's ``GET /sdapi/v1/embeddings``: ``{"loaded": {name: {step, sd_checkpoint,
    sd_checkpoint_name, shape, vectors}}, "skipped": {...}}``. With ``expected_width`` (768 SD1,
    1024 SD2, 2048 SDXL) embeddings for other models are listed under ``skipped``, as A1111 does
    for the loaded checkpoint. Unreadable files are left out (and logged)."""
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for path in _iter_files(embeddings_dir, EMBEDDING_SUFFIXES):
        try:
            embedding = read_embedding(path)
        except EmbeddingError as exc:
            log.warning("%s", exc)
            continue
        entry = {
            "step": embedding.step,
            "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name,
            "shape": embedding.width,
            "vectors": embedding.vector_count,
        }
        target = skipped if expected_width is not None and embedding.width != expected_width else loaded
        target.setdefault(embedding.name, entry)
    return {"loaded": loaded, "skipped": skipped}


def _mentions(text: str, stem: str) -> set[str]:
    """Spellings of ``stem`` used as a word in ``text`` (case-insensitive, like A1111's matching
    of CLIP's lowercased tokens)."""
    pattern = re.compile(rf"(?<![\w]){re.escape(stem)}(?![\w])", re.IGNORECASE)
    return {match.group(0) for match in pattern.finditer(text)}


def _encoder_slots(pipe: Any) -> list[tuple[str, Any, Any]]:
    """(vector key, tokenizer, text encoder) for each text encoder the pipeline has."""
    slots = []
    for key, tokenizer_name, encoder_name in (
        ("clip_l", "tokenizer", "text_encoder"),
        ("clip_g", "tokenizer_2", "text_encoder_2"),
    ):
        tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
        if tokenizer is not None and encoder is not None:
            slots.append((key, tokenizer, encoder))
    return slots


def _vectors_for_slots(pipe: Any, embedding: Embedding) -> list[tuple[Any, Any, torch.Tensor]] | str:
    """Pair the embedding's vectors with the pipeline's encoders, or say why they do not fit."""
    slots = _encoder_slots(pipe)
    if "" in embedding.vectors:
        if len(slots) != 1:
            return f"it has {embedding.width}-wide vectors for one text encoder; this model has two (SDXL)"
        _, tokenizer, encoder = slots[0]
        return [(tokenizer, encoder, embedding.vectors[""])]
    else:
        if len(slots) == 1 and slots[0][0] == "clip_l":
            return "it is an SDXL embedding (clip_l + clip_g); this model has one text encoder"
        pairs = []
        for key, tokenizer, encoder in slots:
            if key not in embedding.vectors:
                return "it has no vectors for this model's text encoder"
            pairs.append((tokenizer, encoder, embedding.vectors[key]))
    for _, encoder, vectors in pairs:
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            return f"its vectors are {vectors.shape[1]} wide but this model's text encoder expects {width}"
    return pairs


def _vocabulary_clash(tokenizer: Any, names: list[str], path: Path) -> str | None:
    """Why ``names`` cannot be registered as new tokens, or ``None`` when they can. Tokens left over
    from a job that skipped :func:`unload_embeddings` are an engine bug and raise."""
    added = tokenizer.added_tokens_encoder
    loaded = [name for name in names if name in added]
    if loaded:
        raise EmbeddingError(
            f"Embedding {path.name}: token '{loaded[0]}' is already loaded; an earlier job did not call "
            "unload_embeddings. Reload the checkpoint to clear it."
        )
    vocabulary = tokenizer.get_vocab()
    clash = next((name for name in names if name in vocabulary), None)
    if clash is None:
        return None
    return (
        f"'{clash}' is an ordinary CLIP word, so it cannot name an embedding; rename {path.name} "
        "(e.g. add a prefix) and use the new name in the prompt"
    )


def _register_tokens(tokenizer: Any, encoder: Any, names: list[str], vectors: torch.Tensor) -> None:
    import torch
    from tokenizers import AddedToken

    # single_word: "name" must not match inside "surname"; normalized=False: match the spelling
    # exactly as written, so diffusers' maybe_convert_prompt (a plain str.replace) finds it too.
    tokenizer.add_tokens([AddedToken(name, single_word=True, normalized=False) for name in names])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, vector in zip(names, vectors, strict=True):
            weight[tokenizer.convert_tokens_to_ids(name)] = vector.to(
                device=weight.device, dtype=weight.dtype
            )


def _note(notes: list[str] | None, message: str) -> None:
    log.info("%s", message)
    if notes is not None:
        notes.append(message)


def load_embeddings_for_prompt(
    pipe: Any,
    prompt: str,
    negative_prompt: str,
    embeddings_dir: Path,
    *,
    notes: list[str] | None = None,
) -> list[str]:
    """Register the embeddings whose file stems appear as words in either prompt.

    Each distinct spelling found (``EasyNegative``, ``easynegative``) is registered as its own
    token, followed by ``<spelling>_1`` ... for multi-vector embeddings, in every text encoder of
    the pipeline (SDXL files: ``clip_l`` into ``text_encoder``, ``clip_g`` into
    ``text_encoder_2``). Returns every token added; pass the list to :func:`unload_embeddings`
    after the job. Embeddings made for another model family are skipped, as A1111 skips them (the
    word is then encoded as plain text), and so are embeddings whose name is an ordinary CLIP
    word (which cannot become a token of its own); the reason goes to ``notes`` when given.

    Raises :class:`EmbeddingError` for an unreadable embedding file.
    """
    text = strip_extra_networks(f"{prompt}\n{negative_prompt}")[0]
    tokens: list[str] = []
    seen_stems: set[str] = set()
    try:
        for path in _iter_files(embeddings_dir, EMBEDDING_SUFFIXES):
            if path.stem.lower() in seen_stems:
                continue
            spellings = _mentions(text, path.stem)
            if not spellings:
                continue
            seen_stems.add(path.stem.lower())
            embedding = read_embedding(path)
            pairs = _vectors_for_slots(pipe, embedding)
            if isinstance(pairs, str):
                _note(notes, f"embedding '{embedding.name}' skipped: {pairs}")
                continue
            for spelling in sorted(spellings):
                names = [spelling] + [f"{spelling}_{i}" for i in range(1, embedding.vector_count)]
                clash = next(
                    (
                        reason
                        for tokenizer, _, _ in pairs
                        if (reason := _vocabulary_clash(tokenizer, names, path))
                    ),
                    None,
                )
                if clash is not None:
                    _note(notes, f"embedding '{embedding.name}' skipped: {clash}")
                    continue
                for tokenizer, encoder, vectors in pairs:
                    _register_tokens(tokenizer, encoder, names, vectors)
                tokens.extend(name for name in names if name not in tokens)
    except BaseException:
        unload_embeddings(pipe, tokens)
        raise
    return tokens


def unload_embeddings(pipe: Any, tokens: Sequence[str]) -> None:
    """Remove tokens added by :func:`load_embeddings_for_prompt` from every tokenizer/text encoder
    that has them (diffusers' ``unload_textual_inversion``); the prompt encodings are then the
    same as before loading."""
    if not tokens:
        return
    wanted = set(tokens)
    for _, tokenizer, encoder in _encoder_slots(pipe):
        present = [t for t in tokenizer.added_tokens_encoder if t in wanted]
        if not present:
            continue
        pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)
        rows = encoder.get_input_embeddings().weight.shape[0]
        if hasattr(encoder.config, "vocab_size"):
            encoder.config.vocab_size = rows
