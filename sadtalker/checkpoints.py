"""Finding and loading the official SadTalker model files into our networks, strictly.

Files (all in ``models/SadTalker/``):

* ``SadTalker_V0.0.2_256.safetensors`` / ``SadTalker_V0.0.2_512.safetensors``: the keypoint detector,
  generator, audio->expression, audio->pose and face-reconstruction networks under the prefixes
  ``kp_extractor``, ``generator``, ``audio2exp``, ``audio2pose`` and ``face_3drecon``. Both files have
  the same keys and shapes; the 512 one was trained for 512-pixel crops.
* ``mapping_00229-model.pth.tar`` (70 coefficients; crop/extcrop/resize) and
  ``mapping_00109-model.pth.tar`` (73; full/extfull): pickled training checkpoints whose ``mapping``
  entry is the mapping network's state dict. They are read with ``torch.load(weights_only=True)``, so
  no code in them can run; the other entries (epoch, optimizer and discriminator state) are ignored.

* The pre-0.0.2 set (what the reference loads with ``--old_version``, or when it finds no
  safetensors file): ``facevid2vid_00189-model.pth.tar`` (entries ``kp_detector`` and ``generator``;
  its ``he_estimator``, discriminator and optimizer entries are ignored), ``auido2exp_00300-model.pth``
  and ``auido2pose_00140-model.pth`` (the ``model`` entry; "auido" is the official spelling) and
  ``epoch_20.pth`` (``net_recon``, the face reconstruction network). They hold the same networks as
  the safetensors file and are read with ``torch.load(weights_only=True)`` into the same modules.
  :func:`load_sadtalker_models` uses them when the safetensors file for the asked size is absent;
  like the reference, the same (256-pixel-trained) files then serve both sizes.

Every key and shape is checked before any tensor is read, so a wrong or truncated file is reported by
name, with the first missing/unexpected keys and how to get the right one. BatchNorm's
``num_batches_tracked`` counters are accepted whether present or not (and never used at inference).
Networks are built on the meta device and the file's tensors are assigned to them, so loading needs
no random initialisation and holds each weight in memory only once.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from installer.launch_command import launch_command
from sadtalker.errors import SadTalkerCheckpointError, SadTalkerError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sadtalker.networks.audio2exp import AudioToExpression
    from sadtalker.networks.audio2pose import AudioToPose
    from sadtalker.networks.face_recon import FaceReconstructionNet
    from sadtalker.networks.generator import WarpingSpadeGenerator
    from sadtalker.networks.keypoint_detector import CanonicalKeypointDetector
    from sadtalker.networks.mapping import MappingNet

SADTALKER_FOLDER = "SadTalker"
RENDER_SIZES = (256, 512)
MAPPING_CROP_FILE = "mapping_00229-model.pth.tar"
MAPPING_FULL_FILE = "mapping_00109-model.pth.tar"
CROP_PREPROCESS_MODES = ("crop", "extcrop", "resize")
FULL_PREPROCESS_MODES = ("full", "extfull")
# Top-level entries that may appear in a SadTalker safetensors file without being loaded: the head
# estimator of the original face-vid2vid model is never used by SadTalker's renderer.
IGNORED_PREFIXES = ("he_estimator",)
BATCH_COUNTER_SUFFIX = "num_batches_tracked"
_KEYS_SHOWN = 5
LEGACY_FACEVID2VID_FILE = "facevid2vid_00189-model.pth.tar"
LEGACY_AUDIO2EXP_FILE = "auido2exp_00300-model.pth"
LEGACY_AUDIO2POSE_FILE = "auido2pose_00140-model.pth"
LEGACY_FACE_RECON_FILE = "epoch_20.pth"
LEGACY_FILES = (
    LEGACY_FACEVID2VID_FILE,
    LEGACY_AUDIO2EXP_FILE,
    LEGACY_AUDIO2POSE_FILE,
    LEGACY_FACE_RECON_FILE,
)
# Where each of our sub-models sits in the pre-0.0.2 files: (file, top-level entry, our prefix).
LEGACY_LAYOUT = (
    (LEGACY_FACEVID2VID_FILE, "kp_detector", "kp_extractor"),
    (LEGACY_FACEVID2VID_FILE, "generator", "generator"),
    (LEGACY_AUDIO2EXP_FILE, "model", "audio2exp"),
    (LEGACY_AUDIO2POSE_FILE, "model", "audio2pose"),
    (LEGACY_FACE_RECON_FILE, "net_recon", "face_3drecon"),
)


def checkpoint_file_name(size: int) -> str:
    """Official file name of the main checkpoint for a render size (256 or 512)."""
    return f"SadTalker_V0.0.2_{size}.safetensors"


def mapping_file_name(preprocess: str) -> str:
    """Official mapping file for a preprocess mode: 70 coefficients for crops, 73 for full images."""
    if preprocess in CROP_PREPROCESS_MODES:
        return MAPPING_CROP_FILE
    if preprocess in FULL_PREPROCESS_MODES:
        return MAPPING_FULL_FILE
    modes = ", ".join(CROP_PREPROCESS_MODES + FULL_PREPROCESS_MODES)
    raise SadTalkerError(f"Unknown preprocess mode '{preprocess}'. Choose one of: {modes}.")


def download_hint(file_name: str) -> str:
    """Where to get an official file: our downloader, or the official release/hub repository."""
    return (
        "Download it with "
        f"`{launch_command('download vinthony/SadTalker --kind SadTalker --file', file_name)}` "
        "(or take it from the official SadTalker release, https://github.com/OpenTalker/SadTalker/releases, "
        f"or https://huggingface.co/vinthony/SadTalker) and put it in models/{SADTALKER_FOLDER}/."
    )


@dataclass(frozen=True)
class SadTalkerFiles:
    """Which official files are present in ``models/SadTalker/`` (``None`` where missing)."""

    folder: Path
    checkpoint_256: Path | None
    checkpoint_512: Path | None
    mapping_crop: Path | None
    mapping_full: Path | None
    legacy: Mapping[str, Path | None] = field(default_factory=dict)  # LEGACY_FILES -> path or None

    def checkpoint(self, size: int) -> Path:
        """The main checkpoint for ``size``, or a :class:`SadTalkerCheckpointError` saying how to get it."""
        _check_size(size)
        found = self.checkpoint_256 if size == 256 else self.checkpoint_512
        return found or _raise_missing_checkpoint(self.folder, size)

    def missing_legacy_files(self) -> list[str]:
        """The pre-0.0.2 files that are absent, in ``LEGACY_FILES`` order."""
        return [name for name in LEGACY_FILES if self.legacy.get(name) is None]

    def mapping(self, preprocess: str) -> Path:
        """The mapping file for a preprocess mode, or an error saying how to get it."""
        name = mapping_file_name(preprocess)
        found = self.mapping_crop if name == MAPPING_CROP_FILE else self.mapping_full
        return found or _raise_missing(self.folder / name, f"the '{preprocess}' preprocess mode")


def find_sadtalker_files(models_dir: Path) -> SadTalkerFiles:
    """Locate the official SadTalker files in ``models_dir/SadTalker/`` by their official names."""
    folder = models_dir / SADTALKER_FOLDER

    def present(name: str) -> Path | None:
        path = folder / name
        return path if path.is_file() else None

    return SadTalkerFiles(
        folder=folder,
        checkpoint_256=present(checkpoint_file_name(256)),
        checkpoint_512=present(checkpoint_file_name(512)),
        mapping_crop=present(MAPPING_CROP_FILE),
        mapping_full=present(MAPPING_FULL_FILE),
        legacy={name: present(name) for name in LEGACY_FILES},
    )


def load_sadtalker_models(models_dir: Path, size: int) -> SadTalkerModels:
    """The five networks for ``size`` from ``models_dir/SadTalker``: the 0.0.2 safetensors file when
    present, else the complete pre-0.0.2 set.

    A partial pre-0.0.2 set is an error that names every missing file (a user who copied three of
    the four files learns about the fourth at once, not one file per attempt).
    """
    _check_size(size)
    files = find_sadtalker_files(models_dir)
    current = files.checkpoint_256 if size == 256 else files.checkpoint_512
    if current is not None:
        return load_sadtalker_checkpoint(current, size)
    missing = files.missing_legacy_files()
    if not missing:
        return load_legacy_checkpoints(files.folder, size)
    if len(missing) < len(LEGACY_FILES):
        found = [name for name in LEGACY_FILES if name not in missing]
        raise SadTalkerCheckpointError(
            f"{files.folder} holds part of the pre-0.0.2 SadTalker checkpoint set ({', '.join(found)}) "
            f"but not {', '.join(missing)}. Add the missing file(s) from the same download, or use "
            f"{checkpoint_file_name(size)} instead: {download_hint(checkpoint_file_name(size))}"
        )
    _raise_missing_checkpoint(files.folder, size)


def load_legacy_checkpoints(folder: Path, size: int) -> SadTalkerModels:
    """Load the pre-0.0.2 files of ``folder`` strictly into our networks (on the CPU).

    Each file is read with ``torch.load(weights_only=True)`` (no pickled code can run), every entry's
    keys and shapes are checked before any weight is assigned, and the file's other entries
    (optimizers, discriminator, the unused head-pose estimator, epoch) are ignored.
    """
    import torch

    from sadtalker.networks.factory import SUB_MODEL_PREFIXES, build_sub_model

    _check_size(size)
    with torch.device("meta"):
        networks = {prefix: build_sub_model(prefix) for prefix in SUB_MODEL_PREFIXES}
    for file_name in LEGACY_FILES:
        path = folder / file_name
        entries = [(entry, prefix) for name, entry, prefix in LEGACY_LAYOUT if name == file_name]
        checkpoint = _load_weights_only(path, "a SadTalker checkpoint")
        states: dict[str, dict[str, torch.Tensor]] = {}
        problems: list[str] = []
        for entry, prefix in entries:
            state = checkpoint.get(entry)
            if not isinstance(state, Mapping):
                problems.append(
                    f"no '{entry}' state dict (top-level entries: {_first(sorted(map(str, checkpoint)))})"
                )
                continue
            tensors = {str(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}
            not_tensors = sorted(str(key) for key in state if str(key) not in tensors)
            if not_tensors:
                problems.append(f"{entry}: entries that are not tensors: {_first(not_tensors)}")
            shapes = {key: tuple(value.shape) for key, value in tensors.items()}
            problems += [f"{entry}: {problem}" for problem in _compare_keys(networks[prefix], shapes)]
            states[prefix] = tensors
        if problems:
            raise SadTalkerCheckpointError(_mismatch_message(path, problems))
        for prefix, tensors in states.items():
            _assign_weights(networks[prefix], tensors, path, prefix)
        del checkpoint, states
    return SadTalkerModels(size=size, source="pre-0.0.2 checkpoints", **networks)  # type: ignore[arg-type]


@dataclass
class SadTalkerModels:
    """The five networks of a SadTalker checkpoint, in eval mode with gradients off."""

    size: int
    kp_extractor: CanonicalKeypointDetector
    generator: WarpingSpadeGenerator
    audio2exp: AudioToExpression
    audio2pose: AudioToPose
    face_3drecon: FaceReconstructionNet
    source: str = ""  # the file(s) the weights came from, for the job's sidecar

    def networks(self) -> dict[str, nn.Module]:
        """The networks by checkpoint prefix."""
        return {
            "kp_extractor": self.kp_extractor,
            "generator": self.generator,
            "audio2exp": self.audio2exp,
            "audio2pose": self.audio2pose,
            "face_3drecon": self.face_3drecon,
        }

    def to(self, device: torch.device | str) -> SadTalkerModels:
        """Move every network to ``device`` (in place) and return ``self``."""
        for network in self.networks().values():
            network.to(device)
        return self


def load_sadtalker_checkpoint(path: Path, size: int) -> SadTalkerModels:
    """Load ``SadTalker_V0.0.2_{size}.safetensors`` strictly into our networks (on the CPU)."""
    import torch
    from safetensors import SafetensorError, safe_open

    from sadtalker.networks.factory import SUB_MODEL_PREFIXES, build_sub_model

    _check_size(size)
    other_size = 512 if size == 256 else 256
    if path.name == checkpoint_file_name(other_size):
        raise SadTalkerCheckpointError(
            f"{path.name} is the {other_size}-pixel model but a {size}-pixel render was asked for. "
            f"Choose size {other_size}, or use {checkpoint_file_name(size)}."
        )
    if not path.is_file():
        _raise_missing(path, f"the {size}-pixel face renderer")
    header_shapes = _read_header_shapes(path)

    with torch.device("meta"):
        networks = {prefix: build_sub_model(prefix) for prefix in SUB_MODEL_PREFIXES}
    file_keys_by_prefix: dict[str, dict[str, tuple[int, ...]]] = {prefix: {} for prefix in SUB_MODEL_PREFIXES}
    unknown: list[str] = []
    for key, shape in header_shapes.items():
        prefix, _, local = key.partition(".")
        if prefix in file_keys_by_prefix and local:
            file_keys_by_prefix[prefix][local] = shape
        elif prefix not in IGNORED_PREFIXES:
            unknown.append(key)
    problems = [f"unexpected keys outside the known sub-models: {_first(unknown)}"] if unknown else []
    for prefix, network in networks.items():
        problems += [
            f"{prefix}: {problem}" for problem in _compare_keys(network, file_keys_by_prefix[prefix])
        ]
    if problems:
        raise SadTalkerCheckpointError(_mismatch_message(path, problems))

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for prefix, network in networks.items():
                tensors = {
                    local: handle.get_tensor(f"{prefix}.{local}") for local in file_keys_by_prefix[prefix]
                }
                _assign_weights(network, tensors, path, prefix)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise SadTalkerCheckpointError(
            f"{path.name}: cannot read the tensors ({exc}). The file is damaged: {download_hint(path.name)}"
        ) from exc
    return SadTalkerModels(size=size, source=path.name, **networks)  # type: ignore[arg-type]


def load_mapping(path: Path) -> MappingNet:
    """Load a mapping checkpoint's ``mapping`` state dict strictly; 70 or 73 coefficients, from the file."""
    import torch

    from sadtalker.networks.factory import build_mapping
    from sadtalker.networks.mapping import MAPPING_COEFFICIENT_COUNTS

    if not path.is_file():
        _raise_missing(path, "the face renderer's mapping network")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
        raise SadTalkerCheckpointError(
            f"{path.name}: not a readable mapping checkpoint ({exc}). {download_hint(path.name)}"
        ) from exc
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("mapping"), Mapping):
        found = (
            _first(sorted(map(str, checkpoint)))
            if isinstance(checkpoint, Mapping)
            else type(checkpoint).__name__
        )
        raise SadTalkerCheckpointError(
            f"{path.name}: expected a checkpoint with a 'mapping' entry, found {found}. "
            f"It is not a SadTalker mapping file: {download_hint(path.name)}"
        )
    state = {str(key): value for key, value in checkpoint["mapping"].items()}
    first = state.get("first.0.weight")
    coeff_count = first.shape[1] if isinstance(first, torch.Tensor) and first.dim() == 3 else None
    if coeff_count not in MAPPING_COEFFICIENT_COUNTS:
        raise SadTalkerCheckpointError(
            _mismatch_message(
                path,
                [f"first.0.weight should be [1024, 70 or 73, 7], found {_shape_text(first)}"],
            )
        )
    with torch.device("meta"):
        mapping = build_mapping(int(coeff_count))
    shapes = {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    problems = _compare_keys(mapping, shapes)
    not_tensors = sorted(set(state) - set(shapes))
    if not_tensors:
        problems.append(f"entries that are not tensors: {_first(not_tensors)}")
    if problems:
        raise SadTalkerCheckpointError(
            _mismatch_message(path, [f"mapping: {problem}" for problem in problems])
        )
    _assign_weights(mapping, state, path, "mapping")
    return mapping


def _load_weights_only(path: Path, what: str) -> Mapping[str, object]:
    """A pickled checkpoint read with ``torch.load(weights_only=True)``, as a mapping of its entries."""
    import torch

    if not path.is_file():
        _raise_missing(path, what)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SadTalkerCheckpointError(
            f"{path.name}: holds pickled Python objects besides tensors, and SD Studio only reads "
            f".pth files with torch.load(weights_only=True) because unpickling can run code ({exc}). "
            f"Use the official file: {download_hint(path.name)}"
        ) from exc
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
        raise SadTalkerCheckpointError(
            f"{path.name}: not a readable checkpoint ({exc}); it may be truncated. {download_hint(path.name)}"
        ) from exc
    if not isinstance(checkpoint, Mapping):
        raise SadTalkerCheckpointError(
            f"{path.name}: holds a {type(checkpoint).__name__}, not {what}. {download_hint(path.name)}"
        )
    return {str(key): value for key, value in checkpoint.items()}


def _check_size(size: int) -> None:
    if size not in RENDER_SIZES:
        raise SadTalkerError(f"SadTalker renders at 256 or 512 pixels; size {size} is not available.")


def _raise_missing_checkpoint(folder: Path, size: int) -> NoReturn:
    _raise_missing(
        folder / checkpoint_file_name(size),
        f"the {size}-pixel face renderer; the complete pre-0.0.2 set ({', '.join(LEGACY_FILES)}) works too",
    )


def _raise_missing(path: Path, purpose: str) -> NoReturn:
    raise SadTalkerCheckpointError(
        f"{path.name} was not found in {path.parent} (needed for {purpose}). {download_hint(path.name)}"
    )


def _read_header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from pipelines.errors import CheckpointLoadError
    from pipelines.models.safetensors_header import read_safetensors_header

    try:
        header = read_safetensors_header(path)
    except CheckpointLoadError as exc:
        raise SadTalkerCheckpointError(f"{exc} {download_hint(path.name)}") from exc
    return {name: info.shape for name, info in header.tensors.items()}


def _compare_keys(network: nn.Module, file_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Differences between a network's state dict and a file's keys/shapes (batch counters exempt)."""
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    counters = {key for key in expected if key.endswith(BATCH_COUNTER_SUFFIX)}
    missing = sorted(set(expected) - set(file_shapes) - counters)
    unexpected = sorted(
        key for key in set(file_shapes) - set(expected) if not key.endswith(BATCH_COUNTER_SUFFIX)
    )
    wrong_shape = sorted(
        f"{key} (file {list(file_shapes[key])}, expected {list(expected[key])})"
        for key in set(expected) & set(file_shapes)
        if key not in counters and tuple(file_shapes[key]) != expected[key]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys with the wrong shape: {_first(wrong_shape)}")
    return problems


def _assign_weights(network: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, prefix: str) -> None:
    """Put a file's tensors into a meta-built network with a strict ``load_state_dict``.

    The file's batch counters are replaced by zeros (present or not, their value is never used in
    eval mode); floating tensors are converted to the network's dtype (float32) so half-precision
    copies of the checkpoint load too.
    """
    import torch

    state: dict[str, torch.Tensor] = {}
    for key, placeholder in network.state_dict().items():
        if key.endswith(BATCH_COUNTER_SUFFIX):
            state[key] = torch.zeros((), dtype=torch.long)
            continue
        value = tensors[key]
        if value.is_floating_point():
            value = value.to(placeholder.dtype)
        state[key] = value.contiguous()
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SadTalkerCheckpointError(
            f"{path.name}: {prefix} weights do not fit ({exc}). {download_hint(path.name)}"
        ) from exc
    left_on_meta = [name for name, value in _tensors_of(network) if value.is_meta]
    if left_on_meta:
        raise SadTalkerCheckpointError(
            f"{path.name}: {prefix} was not fully loaded (no data for {_first(left_on_meta)}). "
            + download_hint(path.name)
        )
    network.eval()
    network.requires_grad_(False)


def _tensors_of(network: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from network.named_parameters()
    yield from network.named_buffers()


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f", ... ({len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else "")


def _shape_text(value: object) -> str:
    shape = getattr(value, "shape", None)
    return "nothing" if value is None else (str(list(shape)) if shape is not None else type(value).__name__)


def _mismatch_message(path: Path, problems: list[str]) -> str:
    return (
        f"{path.name} does not hold the official SadTalker weights this engine expects: "
        + "; ".join(problems)
        + f". {download_hint(path.name)}"
    )
