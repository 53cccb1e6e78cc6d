"""Face restoration: Haar detection, alignment/paste-back, visibility, model files and errors.

RestoreFormer is built by spandrel with a tiny config (spandrel reads its sizes from the weights);
GFPGAN's size is fixed by spandrel, so the full network is built once, with random weights, and
run once on CPU. The face is scikit-image's astronaut photo (bundled with the package).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import pipelines.postprocess.face_restore as face_restore
from pipelines.postprocess.face_restore import (
    DETECTOR_HAAR,
    FaceRestorerNotFoundError,
    FaceRestorerWeightsMissingError,
    alignment_matrix,
    detect_faces_haar,
    list_face_restorers,
    restore_faces,
)
from pipelines.postprocess.upscalers import ImageModelLoadError, UpscalerCache


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage.data import astronaut

    return Image.fromarray(astronaut())


def _tiny_restoreformer(seed: int) -> dict[str, torch.Tensor]:
    from spandrel.architectures.RestoreFormer import RestoreFormer

    torch.manual_seed(seed)
    model = RestoreFormer(
        n_embed=16, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32
    )
    return model.state_dict()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RestoreFormer where GFPGAN's release puts it, and a 2x upscaler misplaced among faces."""
    from spandrel.architectures.Compact import Compact

    root = tmp_path_factory.mktemp("models")
    (root / "GFPGAN").mkdir()
    save_file(_tiny_restoreformer(seed=0), root / "GFPGAN" / "RestoreFormer.safetensors")
    torch.manual_seed(1)
    upscaler = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    save_file(upscaler.state_dict(), root / "GFPGAN" / "2x-upscaler.safetensors")
    return root


@pytest.fixture(scope="module")
def cache() -> UpscalerCache:
    return UpscalerCache()


@pytest.fixture(scope="module")
def restored(
    astronaut: Image.Image, models_root: Path, cache: UpscalerCache
) -> face_restore.FaceRestoreResult:
    """The astronaut with an alpha channel, restored at full visibility (one model run)."""
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(astronaut.size))
    return restore_faces(rgba, model="RestoreFormer", cache=cache, models_root=models_root, device="cpu")


def test_haar_finds_the_astronaut_with_eyes(astronaut: Image.Image) -> None:
    faces = detect_faces_haar(np.asarray(astronaut))
    assert len(faces) >= 1
    face = faces[0]
    x, y, w, h = face.box
    assert face.eyes_detected
    assert len(face.landmarks) == 5
    for px, py in face.landmarks:
        assert x <= px <= x + w and y <= py <= y + h
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0]
    assert left_eye[1] < nose[1] < mouth_left[1] and mouth_left[0] < mouth_right[0]
    assert alignment_matrix(face.landmarks) is not None


def test_restore_keeps_size_mode_alpha_and_the_background(
    restored: face_restore.FaceRestoreResult, astronaut: Image.Image
) -> None:
    assert restored.faces_found >= 1
    assert restored.detector == DETECTOR_HAAR
    assert restored.image.size == astronaut.size and restored.image.mode == "RGBA"
    assert any("Haar" in message for message in restored.messages)
    assert any("RestoreFormer" in message for message in restored.messages)
    before = np.asarray(astronaut)
    after = np.asarray(restored.image.convert("RGB"))
    x, y, w, h = detect_faces_haar(before)[0].box
    assert not np.array_equal(after[y : y + h, x : x + w], before[y : y + h, x : x + w])
    assert np.array_equal(after[440:, 430:], before[440:, 430:])  # far from the face: untouched
    alpha = np.asarray(restored.image.getchannel("A"))
    assert np.array_equal(alpha, np.asarray(Image.linear_gradient("L").resize(astronaut.size)))


def test_visibility_zero_returns_the_input(astronaut: Image.Image, tmp_path: Path) -> None:
    # no weights needed: nothing is restored
    result = restore_faces(astronaut, model="GFPGAN", visibility=0.0, cache=None, models_root=tmp_path)
    assert np.array_equal(np.asarray(result.image), np.asarray(astronaut))
    assert result.faces_found >= 1


def test_visibility_blends_with_the_original(
    astronaut: Image.Image,
    models_root: Path,
    cache: UpscalerCache,
    restored: face_restore.FaceRestoreResult,
) -> None:
    half = restore_faces(
        astronaut, model="RestoreFormer", visibility=0.5, cache=cache, models_root=models_root
    )
    full = np.asarray(restored.image.convert("RGB")).astype(np.float32)
    expected = 0.5 * full + 0.5 * np.asarray(astronaut).astype(np.float32)
    assert np.abs(np.asarray(half.image).astype(np.float32) - expected).max() <= 1.0


def test_identity_restorer_gives_back_the_image(
    astronaut: Image.Image, models_root: Path, cache: UpscalerCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Align, warp back and feathered paste must put the face back where it was."""
    monkeypatch.setattr(face_restore, "_run_face_model", lambda descriptor, crop: crop)
    result = restore_faces(astronaut, model="RestoreFormer", cache=cache, models_root=models_root)
    difference = np.abs(np.asarray(result.image).astype(int) - np.asarray(astronaut).astype(int))
    assert result.faces_found >= 1
    assert difference.mean() < 2.0  # only resampling blur


def test_no_face_returns_the_image_unchanged(models_root: Path, cache: UpscalerCache) -> None:
    landscape = Image.linear_gradient("L").resize((160, 120)).convert("RGB")
    result = restore_faces(landscape, model="RestoreFormer", cache=cache, models_root=models_root)
    assert result.faces_found == 0
    assert np.array_equal(np.asarray(result.image), np.asarray(landscape))
    assert any("No face found" in message for message in result.messages)


def test_missing_weights_name_the_file_and_the_download(astronaut: Image.Image, tmp_path: Path) -> None:
    with pytest.raises(FaceRestorerWeightsMissingError) as caught:
        restore_faces(astronaut, model="GFPGAN", cache=None, models_root=tmp_path)
    message = str(caught.value)
    assert str(Path("GFPGAN") / "GFPGANv1.4.pth") in message
    url = "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/GFPGANv1.4.pth"
    assert f"python3 launch.py download {url} --kind GFPGAN" in message


def test_non_model_safetensors_is_a_clear_error(astronaut: Image.Image, tmp_path: Path) -> None:
    (tmp_path / "GFPGAN").mkdir()
    save_file({"hello": torch.zeros(2)}, tmp_path / "GFPGAN" / "GFPGANv1.4.safetensors")
    with pytest.raises(ImageModelLoadError, match=r"GFPGANv1\.4\.safetensors: spandrel .* not recognise"):
        restore_faces(astronaut, model="GFPGAN", cache=None, models_root=tmp_path)


def test_upscaler_is_not_a_face_restorer(astronaut: Image.Image, models_root: Path) -> None:
    with pytest.raises(ImageModelLoadError, match="not a face restoration model"):
        restore_faces(astronaut, model="2x-upscaler", cache=None, models_root=models_root)


def test_unsupported_and_unknown_restorers(astronaut: Image.Image, models_root: Path) -> None:
    with pytest.raises(FaceRestorerNotFoundError, match="spandrel_extra_arches"):
        restore_faces(astronaut, model="CodeFormer", cache=None, models_root=models_root)
    with pytest.raises(FaceRestorerNotFoundError, match="Choices: GFPGAN, RestoreFormer"):
        restore_faces(astronaut, model="BeautyFilter", cache=None, models_root=models_root)
    with pytest.raises(Exception, match="visibility must be between 0 and 1"):
        restore_faces(astronaut, model="GFPGAN", visibility=1.5, cache=None, models_root=models_root)


def test_face_restorer_listing(models_root: Path, tmp_path: Path) -> None:
    assert list_face_restorers(tmp_path) == [{"name": "GFPGAN", "cmd_dir": str(tmp_path / "GFPGAN")}]
    names = [entry["name"] for entry in list_face_restorers(models_root)]
    assert names == ["GFPGAN", "RestoreFormer"]


def test_gfpgan_restores_through_spandrel(astronaut: Image.Image, tmp_path: Path) -> None:
    """The real GFPGANv1.4 network size (spandrel fixes it), random weights, one run at 512."""
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(0)
    network = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    (tmp_path / "GFPGAN").mkdir()
    # fp16 on disk halves the file; the loader runs it in float32 on CPU
    save_file(
        {k: v.half() for k, v in network.state_dict().items()}, tmp_path / "GFPGAN" / "GFPGANv1.4.safetensors"
    )
    del network
    result = restore_faces(astronaut, model="GFPGAN", cache=None, models_root=tmp_path, device="cpu")
    assert result.faces_found >= 1 and result.image.size == astronaut.size
    assert any("GFPGAN (GFPGANv1.4.safetensors) restored" in message for message in result.messages)
    assert not np.array_equal(np.asarray(result.image), np.asarray(astronaut))


class RenamedHaar:
    """A stand-in five-point detector: Haar's faces, reported under another name."""

    name = "test detector"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rgb: np.ndarray) -> list[face_restore.DetectedFace]:
        self.calls += 1
        return detect_faces_haar(rgb)


def test_a_given_detector_replaces_haar(
    astronaut: Image.Image, models_root: Path, cache: UpscalerCache
) -> None:
    detector = RenamedHaar()
    result = restore_faces(
        astronaut, model="RestoreFormer", cache=cache, models_root=models_root, detector=detector
    )
    assert detector.calls == 1 and result.detector == "test detector"
    assert "Face detector: test detector; 1 face(s) found." in result.messages
    assert not np.array_equal(np.asarray(result.image), np.asarray(astronaut))


def test_retinaface_weights_in_models_give_the_restorer_retinaface(tmp_path: Path) -> None:
    from app.face_detection import DETECTOR_FILE, RetinaFaceProvider, RetinaFaceRestoreDetector
    from sadtalker.face_detection import FaceDetection, RetinaFaceNet

    provider = RetinaFaceProvider(tmp_path, device="cpu")
    assert provider() is None  # no weights: the engine falls back to OpenCV Haar
    (tmp_path / "GFPGAN").mkdir()
    torch.manual_seed(0)
    torch.save(RetinaFaceNet().state_dict(), tmp_path / "GFPGAN" / DETECTOR_FILE)
    detector = provider()
    assert isinstance(detector, RetinaFaceRestoreDetector) and provider() is detector  # loaded once

    class Scripted:
        def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
            points = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], dtype=np.float32)
            return [FaceDetection(box=(10.5, 20.0, 90.0, 100.0), score=0.99, five_points=points)]

    (face,) = RetinaFaceRestoreDetector(Scripted())(np.zeros((120, 120, 3), dtype=np.uint8))
    assert face.box == (10, 20, 79, 80)
    assert face.landmarks[0] == (30.0, 40.0) and face.landmarks[4] == (65.0, 80.0)
    assert alignment_matrix(face.landmarks) is not None


def test_the_studio_engine_asks_for_retinaface_per_job(studio) -> None:
    from app.face_detection import RetinaFaceProvider

    provider = studio.engine.config.face_detector
    assert isinstance(provider, RetinaFaceProvider)
    assert provider.models_root == studio.settings.models_dir
