"""The background enhancer: an upscaler from ``models/ESRGAN`` over every frame (issue #14 item 8).

A tiny random-weight ESRGAN (RRDBNet, the original key layout spandrel detects) is saved where users
put theirs, ``models/ESRGAN/<name>.safetensors``; the SadTalker files are the session's random-weight
ones (the face generator is the cheap stand-in, see ``helpers.CheapGenerator``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.postprocess.upscalers import load_image_model, pil_to_tensor, tensor_to_pil
from sadtalker.background import find_background_upscaler, load_background_enhancer
from sadtalker.engine import TalkingHeadEngine, TalkingHeadRequest
from sadtalker.errors import SadTalkerError
from tests.sadtalker.helpers import CheapGenerator, decode_frames, write_wav

UPSCALER = "2x-tiny-esrgan"


def tiny_esrgan_state(scale: int, seed: int) -> dict[str, torch.Tensor]:
    """ESRGAN with one RRDB block and 8 filters: the real architecture and key layout, tiny."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict()


@pytest.fixture(scope="module")
def models_root(sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the SadTalker files and ``ESRGAN/2x-tiny-esrgan.safetensors``."""
    root = tmp_path_factory.mktemp("background_models")
    (root / "SadTalker").symlink_to(sadtalker_models_root / "SadTalker", target_is_directory=True)
    (root / "ESRGAN").mkdir()
    save_file(tiny_esrgan_state(2, seed=3), str(root / "ESRGAN" / f"{UPSCALER}.safetensors"))
    return root


@pytest.fixture(scope="module")
def short_speech(media_dir: Path) -> Path:
    t = np.arange(int(16000 * 0.2)) / 16000  # 5 video frames
    return write_wav(media_dir / "background_tone.wav", 0.4 * np.sin(2 * np.pi * 300 * t))


@pytest.fixture(scope="module")
def cheap_engine(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TalkingHeadEngine:
    engine = TalkingHeadEngine(models_root, tmp_path_factory.mktemp("background_outputs"), device="cpu")
    engine.models(256).generator = CheapGenerator()
    return engine


def test_upscalers_are_found_by_listed_name_file_name_or_stem(models_root: Path) -> None:
    expected = models_root / "ESRGAN" / f"{UPSCALER}.safetensors"
    for name in (UPSCALER, UPSCALER.upper(), f"{UPSCALER}.safetensors", f" {UPSCALER} "):
        assert find_background_upscaler(models_root, name) == expected


@pytest.mark.parametrize("name", ["4x-UltraSharp", "Lanczos", "None"])
def test_an_unknown_upscaler_names_the_field_and_the_folder(models_root: Path, name: str) -> None:
    with pytest.raises(SadTalkerError) as caught:
        find_background_upscaler(models_root, name)
    message = str(caught.value)
    assert message.startswith("background_enhancer:") and f"'{name}'" in message
    assert str(models_root / "ESRGAN") in message and UPSCALER in message  # where, and what there is


def test_a_path_is_never_read_as_an_upscaler(models_root: Path) -> None:
    """Only listed names: a client cannot make the server open a file of its choosing."""
    model_path = models_root / "ESRGAN" / f"{UPSCALER}.safetensors"
    for name in (str(model_path), "../ESRGAN/2x-tiny-esrgan.safetensors", "/etc/passwd"):
        with pytest.raises(SadTalkerError, match="background_enhancer"):
            find_background_upscaler(models_root, name)


def test_the_enhancer_upscales_then_brings_the_frame_back_to_its_size(models_root: Path) -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    enhance = load_background_enhancer(models_root, UPSCALER, device="cpu")
    result = enhance(frame)
    assert result.shape == frame.shape and result.dtype == np.uint8
    # By hand: the model at its own 2x, then Lanczos back to 56 x 40 (Real-ESRGAN's outscale=1).
    descriptor = load_image_model(models_root / "ESRGAN" / f"{UPSCALER}.safetensors")
    with torch.inference_mode():
        doubled = tensor_to_pil(descriptor(pil_to_tensor(Image.fromarray(frame))))
    assert doubled.size == (112, 80)
    expected = np.asarray(doubled.resize((56, 40), resample=Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(result, expected)
    assert not np.array_equal(result, frame)


def test_a_face_restoration_model_is_refused_as_background(models_root: Path, tmp_path: Path) -> None:
    from spandrel.architectures.GFPGAN import GFPGAN

    (tmp_path / "ESRGAN").mkdir()
    torch.manual_seed(0)
    save_file(GFPGAN().state_dict(), str(tmp_path / "ESRGAN" / "GFPGANv1.4.safetensors"))
    with pytest.raises(
        SadTalkerError, match=r"background_enhancer: GFPGANv1\.4\.safetensors is a face restoration"
    ):
        load_background_enhancer(tmp_path, "GFPGANv1.4", device="cpu")


def test_engine_runs_the_background_enhancer_on_every_frame(
    cheap_engine: TalkingHeadEngine, astronaut_png: Path, short_speech: Path
) -> None:
    def enhanced_request(**fields: object) -> TalkingHeadRequest:
        return TalkingHeadRequest(image=astronaut_png, audio=short_speech, seed=1, batch_size=5, **fields)

    plain = cheap_engine.run(enhanced_request())
    enhanced = cheap_engine.run(enhanced_request(background_enhancer=UPSCALER))
    plain_frames, enhanced_frames = decode_frames(plain.path), decode_frames(enhanced.path)
    assert plain_frames.shape == enhanced_frames.shape and plain_frames.shape[0] == 5
    assert np.abs(plain_frames.astype(int) - enhanced_frames.astype(int)).mean() > 1.0
    assert '"background_enhancer": "2x-tiny-esrgan"' in enhanced.sidecar.read_text()

    # An identity face enhancer on top changes nothing: the frames are the background run's.
    request = enhanced_request(enhancer="gfpgan", background_enhancer=UPSCALER)
    both = decode_frames(cheap_engine.run(request, enhance=lambda frame: frame).path)
    np.testing.assert_array_equal(both, enhanced_frames)


def test_the_face_enhancer_works_on_the_background_enhanced_frame(
    models_root: Path, astronaut_png: Path, short_speech: Path, tmp_path: Path
) -> None:
    """GFPGAN's ``bg_upsampler`` order: the frame is upscaled first, the restored face goes over it."""
    order: list[str] = []

    def background_loader(name: str) -> Callable[[np.ndarray], np.ndarray]:
        assert name == UPSCALER

        def upscale(frame: np.ndarray) -> np.ndarray:
            order.append("background")
            marked = frame.copy()
            marked[:8, :8] = (255, 0, 255)
            return marked

        return upscale

    def face(frame: np.ndarray) -> np.ndarray:
        order.append("face")
        assert (frame[:8, :8] == (255, 0, 255)).all()  # it sees the upscaled frame
        return frame

    engine = TalkingHeadEngine(models_root, tmp_path, device="cpu", background_loader=background_loader)
    engine.models(256).generator = CheapGenerator()
    request = TalkingHeadRequest(
        image=astronaut_png,
        audio=short_speech,
        seed=1,
        batch_size=5,
        enhancer="gfpgan",
        background_enhancer=UPSCALER,
    )
    frames = decode_frames(engine.run(request, enhance=face).path)
    assert order == ["background", "face"] * 5
    assert frames[:, 1:6, 1:6].mean(axis=(0, 1, 2)).round(-1).tolist() == [250.0, 0.0, 250.0]


def test_engine_names_the_field_before_loading_anything(
    astronaut_png: Path, short_speech: Path, models_root: Path, tmp_path: Path
) -> None:
    engine = TalkingHeadEngine(models_root, tmp_path, device="cpu")
    request = TalkingHeadRequest(image=astronaut_png, audio=short_speech, background_enhancer="4x-UltraSharp")
    with pytest.raises(
        SadTalkerError, match=r"background_enhancer: there is no upscaler named '4x-UltraSharp'"
    ):
        engine.run(request)
    assert engine._models == {}  # failed before any SadTalker network was read
    assert not (tmp_path / "talking-head").exists() or not any((tmp_path / "talking-head").iterdir())


def test_the_request_field_rejects_an_empty_name() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="background_enhancer"):
        TalkingHeadRequest(image=Path("a.png"), audio=Path("a.wav"), background_enhancer="")


def test_the_api_takes_the_field_through_the_same_model(
    astronaut_png: Path, short_speech: Path, tmp_path: Path
) -> None:
    """The API's job body extends the request model: the field arrives in the staged engine request."""
    import base64

    from app.api.schemas import TalkingHeadApiRequest
    from app.api.talking_head_jobs import stage_talking_head_request

    body = TalkingHeadApiRequest(
        image=base64.b64encode(astronaut_png.read_bytes()).decode(),
        audio=base64.b64encode(short_speech.read_bytes()).decode(),
        background_enhancer=UPSCALER,
        expression_scale=9.0,
        input_yaw=[0, 10],
    )
    staged = stage_talking_head_request(body, tmp_path)
    assert staged.background_enhancer == UPSCALER and staged.expression_scale == 9.0
    assert staged.input_yaw == [0.0, 10.0]
