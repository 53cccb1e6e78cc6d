"""The pre-0.0.2 checkpoint set (the reference's ``--old_version``) loads into the same networks.

The random weights of the session's 0.0.2 files (``conftest.sadtalker_models_root``) are saved again
in the old layout, with the nesting the reference's loaders read: ``facevid2vid_00189-model.pth.tar``
holds ``generator``/``kp_detector``/``he_estimator`` state dicts (plus optimizer entries),
``auido2exp_00300-model.pth`` and ``auido2pose_00140-model.pth`` a ``model`` state dict, and
``epoch_20.pth`` a ``net_recon`` state dict. Rendering through them must give the frames the same
weights give from the 0.0.2 file.
"""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sadtalker.checkpoints import (
    LEGACY_AUDIO2EXP_FILE,
    LEGACY_AUDIO2POSE_FILE,
    LEGACY_FACE_RECON_FILE,
    LEGACY_FACEVID2VID_FILE,
    LEGACY_FILES,
    MAPPING_CROP_FILE,
    MAPPING_FULL_FILE,
    SadTalkerModels,
    load_sadtalker_models,
)
from sadtalker.engine import TalkingHeadEngine, TalkingHeadRequest
from sadtalker.errors import SadTalkerCheckpointError
from tests.sadtalker.helpers import CheapGenerator, decode_frames, write_wav


def _optimizer_state(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """What torch.optim.Adam.state_dict() looks like (ints, floats, lists, tensors)."""
    return {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.999), "params": list(range(len(state)))}],
    }


def save_legacy_set(models: SadTalkerModels, folder: Path, files: tuple[str, ...] = LEGACY_FILES) -> None:
    """``models``' weights as the pre-0.0.2 files (only ``files`` of them)."""
    folder.mkdir(parents=True, exist_ok=True)
    layouts = {
        LEGACY_FACEVID2VID_FILE: {
            "generator": models.generator.state_dict(),
            "kp_detector": models.kp_extractor.state_dict(),
            # The head-pose estimator of face-vid2vid: in the file, never used by SadTalker's renderer.
            "he_estimator": {"fc_roll.weight": torch.randn(66, 2048), "fc_roll.bias": torch.randn(66)},
            "optimizer_generator": _optimizer_state(models.generator.state_dict()),
            "epoch": 189,
        },
        LEGACY_AUDIO2EXP_FILE: {
            "model": models.audio2exp.state_dict(),
            "optimizer": _optimizer_state(models.audio2exp.state_dict()),
            "epoch": 300,
        },
        LEGACY_AUDIO2POSE_FILE: {
            "model": models.audio2pose.state_dict(),
            "optimizer": _optimizer_state(models.audio2pose.state_dict()),
            "epoch": 140,
        },
        LEGACY_FACE_RECON_FILE: {"net_recon": models.face_3drecon.state_dict(), "epoch": 20},
    }
    for name in files:
        torch.save(layouts[name], folder / name)


@pytest.fixture(scope="module")
def current_models(sadtalker_models_root: Path) -> SadTalkerModels:
    return load_sadtalker_models(sadtalker_models_root, 256)


@pytest.fixture(scope="module")
def legacy_models_root(
    current_models: SadTalkerModels, sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``models/SadTalker`` with the pre-0.0.2 set (same weights) and the mapping files, no safetensors."""
    root = tmp_path_factory.mktemp("legacy_models")
    folder = root / "SadTalker"
    save_legacy_set(current_models, folder)
    for name in (MAPPING_CROP_FILE, MAPPING_FULL_FILE):
        (folder / name).symlink_to(sadtalker_models_root / "SadTalker" / name)
    return root


def test_the_old_set_loads_the_same_weights_into_the_same_networks(
    legacy_models_root: Path, current_models: SadTalkerModels
) -> None:
    legacy = load_sadtalker_models(legacy_models_root, 256)
    assert legacy.source == "pre-0.0.2 checkpoints"
    assert current_models.source == "SadTalker_V0.0.2_256.safetensors"
    for prefix, network in legacy.networks().items():
        expected = current_models.networks()[prefix].state_dict()
        loaded = network.state_dict()
        assert loaded.keys() == expected.keys(), prefix
        for key, value in expected.items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(loaded[key], value), f"{prefix}.{key}"
        assert not network.training and not any(p.requires_grad for p in network.parameters())
    # As the reference's --old_version, the same files serve a 512 render when its 0.0.2 file is absent.
    assert load_sadtalker_models(legacy_models_root, 512).size == 512


def test_rendering_through_the_old_set_gives_the_same_frames(
    legacy_models_root: Path, sadtalker_models_root: Path, astronaut_png: Path, tmp_path: Path
) -> None:
    t = np.arange(int(16000 * 0.3)) / 16000
    audio = write_wav(tmp_path / "a.wav", 0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t))
    request = TalkingHeadRequest(image=astronaut_png, audio=audio, seed=5, batch_size=4, input_yaw=[0, 12])

    def render(models_root: Path) -> tuple[np.ndarray, str]:
        engine = TalkingHeadEngine(models_root, tmp_path / models_root.name, device="cpu")
        engine.models(256).generator = CheapGenerator()  # the real generator's weights: compared above
        result = engine.run(request)
        return decode_frames(result.path), result.sidecar.read_text()

    old_frames, old_sidecar = render(legacy_models_root)
    new_frames, _ = render(sadtalker_models_root)
    assert old_frames.shape[0] == 7
    np.testing.assert_array_equal(old_frames, new_frames)
    assert '"checkpoints": "pre-0.0.2 checkpoints"' in old_sidecar


def test_a_partial_old_set_names_every_missing_file(current_models: SadTalkerModels, tmp_path: Path) -> None:
    save_legacy_set(
        current_models, tmp_path / "SadTalker", files=(LEGACY_AUDIO2EXP_FILE, LEGACY_FACE_RECON_FILE)
    )
    with pytest.raises(SadTalkerCheckpointError) as caught:
        load_sadtalker_models(tmp_path, 256)
    message = str(caught.value)
    assert LEGACY_FACEVID2VID_FILE in message and LEGACY_AUDIO2POSE_FILE in message
    assert "SadTalker_V0.0.2_256.safetensors" in message  # the other way out
    assert "holds part of the pre-0.0.2" in message


def test_no_checkpoint_at_all_names_the_current_file_and_the_old_set(tmp_path: Path) -> None:
    (tmp_path / "SadTalker").mkdir()
    with pytest.raises(SadTalkerCheckpointError) as caught:
        load_sadtalker_models(tmp_path, 256)
    message = str(caught.value)
    assert "SadTalker_V0.0.2_256.safetensors was not found" in message
    assert all(name in message for name in LEGACY_FILES)


def test_a_wrong_old_file_is_named_with_its_problem(
    legacy_models_root: Path, current_models: SadTalkerModels, tmp_path: Path
) -> None:
    folder = tmp_path / "SadTalker"
    shutil.copytree(legacy_models_root / "SadTalker", folder, symlinks=True)
    # An audio2pose file where the reconstruction net should be: wrong entry.
    torch.save({"model": current_models.audio2pose.state_dict()}, folder / LEGACY_FACE_RECON_FILE)
    with pytest.raises(SadTalkerCheckpointError, match=r"epoch_20\.pth.*no 'net_recon' state dict"):
        load_sadtalker_models(tmp_path, 256)
    # A state dict with a key renamed (as a DataParallel "module." prefix would).
    state = current_models.audio2exp.state_dict()
    first = next(iter(state))
    state[f"module.{first}"] = state.pop(first)
    torch.save({"model": state}, folder / LEGACY_AUDIO2EXP_FILE)
    with pytest.raises(SadTalkerCheckpointError) as caught:
        load_sadtalker_models(tmp_path, 256)
    message = str(caught.value)
    assert LEGACY_AUDIO2EXP_FILE in message and f"module.{first}" in message and "missing keys" in message


def test_old_files_are_read_without_running_pickled_code(
    legacy_models_root: Path, current_models: SadTalkerModels, tmp_path: Path
) -> None:
    folder = tmp_path / "SadTalker"
    shutil.copytree(legacy_models_root / "SadTalker", folder, symlinks=True)
    # Any object outside torch's weights-only allow-list is refused, not unpickled.
    torch.save(
        {"model": current_models.audio2pose.state_dict(), "config": pathlib.PurePosixPath("x")},
        folder / LEGACY_AUDIO2POSE_FILE,
    )
    with pytest.raises(SadTalkerCheckpointError, match=r"auido2pose_00140-model\.pth.*weights_only=True"):
        load_sadtalker_models(tmp_path, 256)
