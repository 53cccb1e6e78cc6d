"""Shared talking-head fixtures: random-weight official files, a portrait, speech, media probing.

The full-size face generator costs ~15 s per 256-pixel frame on the CI's shared CPUs, so engine tests
swap it for ``helpers.CheapGenerator`` after loading (every other network is the real one, from the
random-weight files); ``test_engine_checkpoint_render.py`` runs the real generator on a 1-frame clip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from sadtalker.checkpoints import MAPPING_CROP_FILE, MAPPING_FULL_FILE, checkpoint_file_name
from sadtalker.networks.factory import SUB_MODEL_PREFIXES, build_mapping, build_sub_model
from tests.sadtalker.test_checkpoint_keys import official_state

SPEECH_TEXT = "Hello there, how are you?"


@pytest.fixture(scope="session")
def sadtalker_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/`` whose ``SadTalker/`` holds random-weight copies of the official 256 and mapping files."""
    root = tmp_path_factory.mktemp("sadtalker_models")
    folder = root / "SadTalker"
    folder.mkdir()
    torch.manual_seed(0)
    networks = {prefix: build_sub_model(prefix) for prefix in SUB_MODEL_PREFIXES}
    from safetensors.torch import save_file

    save_file(official_state(networks), str(folder / checkpoint_file_name(256)))
    del networks
    for name, coefficients in ((MAPPING_CROP_FILE, 70), (MAPPING_FULL_FILE, 73)):
        torch.save({"mapping": build_mapping(coefficients).state_dict(), "epoch": 1}, folder / name)
    return root


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sadtalker_media")


@pytest.fixture(scope="session")
def astronaut_png(media_dir: Path) -> Path:
    import cv2
    from skimage import data

    path = media_dir / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="session")
def speech_wav(media_dir: Path) -> Path:
    """About 1.5 s of synthetic English speech (espeak-ng; CI installs it, see .ci/run)."""
    path = media_dir / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "200", "-w", str(path), SPEECH_TEXT], check=True)
    return path


@pytest.fixture(scope="module")
def engine(sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    """An engine with every real network except the face generator (the cheap stand-in)."""
    from sadtalker.engine import TalkingHeadEngine
    from tests.sadtalker.helpers import CheapGenerator

    engine = TalkingHeadEngine(sadtalker_models_root, tmp_path_factory.mktemp("outputs"), device="cpu")
    engine.models(256).generator = CheapGenerator()
    return engine


@pytest.fixture(scope="module")
def odd_photo(astronaut_png: Path, media_dir: Path) -> Path:
    """A 481 x 401 (odd, not square) cut of the astronaut photo."""
    import cv2

    path = media_dir / "astronaut_481x401.png"
    cv2.imwrite(str(path), cv2.imread(str(astronaut_png))[:401, :481])
    return path
