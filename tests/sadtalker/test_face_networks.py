"""RetinaFace + AWing FAN: official key layout, strict loading from models/, decoding, landmark choice.

Key names, shapes and counts below are facts of facexlib's architectures (``detection/retinaface*.py``
with torchvision's ResNet-50 under ``body.``; ``alignment/awing_arch.py`` built with 4 hourglasses and
98 landmarks), i.e. of the files ``detection_Resnet50_Final.pth`` and ``alignment_WFLW_4HG.pth``.
The networks here have random (seeded) weights, saved in the official layout: the detector as a flat
state dict whose keys carry DataParallel's ``module.`` prefix, the FAN under ``state_dict``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sadtalker.errors import NoFaceError, SadTalkerCheckpointError
from sadtalker.face_alignment import (
    ALIGNMENT_FILE,
    AwingFan,
    heatmap_points,
    landmarks_98_to_68,
)
from sadtalker.face_detection import (
    BGR_MEAN,
    DETECTOR_FILE,
    RetinaFaceDetector,
    RetinaFaceNet,
    decode_boxes,
    decode_points,
    load_network,
    non_maximum_suppression,
    prior_boxes,
)
from sadtalker.preprocess import (
    FACEXLIB_ALIGNMENT_FILE,
    FACEXLIB_DETECTOR_FILE,
    HaarTemplateLandmarker,
    NetworkLandmarker,
    create_landmarker,
    load_image,
    prepare_face,
)

# (key, shape) pairs of the official files.
RETINAFACE_KEYS: dict[str, tuple[int, ...]] = {
    "body.conv1.weight": (64, 3, 7, 7),
    "body.bn1.running_var": (64,),
    "body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "body.layer3.5.conv2.weight": (256, 256, 3, 3),
    "body.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "fpn.output1.0.weight": (256, 512, 1, 1),
    "fpn.output2.0.weight": (256, 1024, 1, 1),
    "fpn.output3.0.weight": (256, 2048, 1, 1),
    "fpn.output3.1.running_mean": (256,),
    "fpn.merge1.0.weight": (256, 256, 3, 3),
    "fpn.merge2.1.weight": (256,),
    "ssh1.conv3X3.0.weight": (128, 256, 3, 3),
    "ssh2.conv5X5_1.0.weight": (64, 256, 3, 3),
    "ssh2.conv5X5_2.1.bias": (64,),
    "ssh3.conv7X7_2.0.weight": (64, 64, 3, 3),
    "ssh3.conv7x7_3.1.running_var": (64,),
    "ClassHead.0.conv1x1.weight": (4, 256, 1, 1),
    "BboxHead.2.conv1x1.bias": (8,),
    "LandmarkHead.1.conv1x1.weight": (20, 256, 1, 1),
}
RETINAFACE_ENTRIES, RETINAFACE_COUNTERS, RETINAFACE_PARAMETERS = 456, 73, 27_293_600
AWING_KEYS: dict[str, tuple[int, ...]] = {
    "conv1.conv.weight": (64, 6, 7, 7),  # RGB + row, column, radius coordinates
    "conv1.conv.bias": (64,),
    "bn1.weight": (64,),
    "conv2.conv1.weight": (64, 64, 3, 3),
    "conv2.conv2.weight": (32, 64, 3, 3),
    "conv2.downsample.0.running_mean": (64,),
    "conv2.downsample.2.weight": (128, 64, 1, 1),
    "conv4.downsample.2.weight": (256, 128, 1, 1),
    "m0.coordconv.conv.weight": (256, 259, 1, 1),  # first hourglass: no boundary channels
    "m1.coordconv.conv.weight": (256, 261, 1, 1),
    "m2.b1_4.conv1.weight": (128, 256, 3, 3),
    "m3.b2_plus_1.conv3.weight": (64, 64, 3, 3),
    "m3.b3_1.bn3.running_var": (64,),
    "top_m_3.conv1.weight": (128, 256, 3, 3),
    "conv_last0.weight": (256, 256, 1, 1),
    "bn_end3.running_mean": (256,),
    "l3.weight": (99, 256, 1, 1),  # 98 landmark heatmaps + 1 boundary heatmap
    "l3.bias": (99,),
    "bl2.weight": (256, 256, 1, 1),
    "al2.weight": (256, 99, 1, 1),
}
AWING_ABSENT = ("bl3.weight", "al3.weight", "m0.b2_plus_2.conv1.weight", "fc.weight")
AWING_ENTRIES, AWING_COUNTERS, AWING_PARAMETERS = 1137, 184, 24_153_036


def layout(network: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


@dataclass(frozen=True)
class OfficialFiles:
    root: Path  # models/ with both files in SadTalker/
    detector: dict[str, torch.Tensor]
    alignment: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> OfficialFiles:
    """Random-weight copies of both facexlib files in ``models/SadTalker`` (official wrapping)."""
    root = tmp_path_factory.mktemp("facexlib_models")
    folder = root / "SadTalker"
    folder.mkdir()
    torch.manual_seed(0)
    detector_state = RetinaFaceNet().state_dict()
    torch.save({f"module.{key}": value for key, value in detector_state.items()}, folder / DETECTOR_FILE)
    alignment_state = AwingFan().state_dict()
    torch.save({"state_dict": alignment_state}, folder / ALIGNMENT_FILE)
    return OfficialFiles(root, detector_state, alignment_state)


@pytest.fixture(scope="module")
def full_landmarker(official_files: OfficialFiles) -> NetworkLandmarker:
    landmarker = create_landmarker(official_files.root, device="cpu")
    assert isinstance(landmarker, NetworkLandmarker)
    return landmarker


def models_with(tmp_path: Path, official_files: OfficialFiles, **placed: str) -> Path:
    """A models folder linking the given official files (``detector=folder``/``alignment=folder``)."""
    source = official_files.root / "SadTalker"
    names = {"detector": DETECTOR_FILE, "alignment": ALIGNMENT_FILE}
    for which, folder in placed.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / names[which]).symlink_to(source / names[which])
    return tmp_path


# --- layout ---------------------------------------------------------------------------------------


def test_networks_have_the_official_key_layout() -> None:
    assert (DETECTOR_FILE, ALIGNMENT_FILE) == (FACEXLIB_DETECTOR_FILE, FACEXLIB_ALIGNMENT_FILE)
    with torch.device("meta"):
        retinaface, awing = RetinaFaceNet(), AwingFan()
    for network, known, entries, counters, parameters in (
        (retinaface, RETINAFACE_KEYS, RETINAFACE_ENTRIES, RETINAFACE_COUNTERS, RETINAFACE_PARAMETERS),
        (awing, AWING_KEYS, AWING_ENTRIES, AWING_COUNTERS, AWING_PARAMETERS),
    ):
        keys = layout(network)
        assert {key: keys.get(key) for key in known} == known
        assert len(keys) == entries
        assert sum(key.endswith("num_batches_tracked") for key in keys) == counters
        assert sum(p.numel() for p in network.parameters()) == parameters
    assert not set(AWING_ABSENT) & set(layout(awing))
    assert not any(key.startswith(("body.fc", "body.avgpool")) for key in layout(retinaface))


# --- loading and the choice of landmarker ---------------------------------------------------------


def test_both_files_load_strictly_into_retinaface_and_awing(
    official_files: OfficialFiles, full_landmarker: NetworkLandmarker
) -> None:
    assert full_landmarker.name == "retinaface-awing"
    detector = full_landmarker.find_face.detector  # type: ignore[attr-defined]
    aligner = full_landmarker.aligner
    assert aligner is not None
    for network, saved in (
        (detector.network, official_files.detector),
        (aligner.network, official_files.alignment),
    ):
        loaded = network.state_dict()
        assert loaded.keys() == saved.keys()
        floats = [key for key in loaded if loaded[key].is_floating_point()]
        assert all(torch.equal(loaded[key], saved[key]) for key in floats)
        assert not network.training and not any(p.requires_grad for p in network.parameters())


def test_the_files_present_pick_the_landmarker(
    tmp_path: Path, official_files: OfficialFiles, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        detector_only = create_landmarker(models_with(tmp_path / "a", official_files, detector="GFPGAN"))
    assert detector_only.name == "retinaface-template"
    assert ALIGNMENT_FILE in caplog.text and "template" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        alignment_only = create_landmarker(models_with(tmp_path / "b", official_files, alignment="SadTalker"))
    assert alignment_only.name == "haar-awing"
    assert DETECTOR_FILE in caplog.text and "Haar" in caplog.text
    caplog.clear()
    (tmp_path / "c").mkdir()
    with caplog.at_level(logging.WARNING):
        neither = create_landmarker(tmp_path / "c")
    assert isinstance(neither, HaarTemplateLandmarker) and neither.name == "haar-template"
    assert DETECTOR_FILE in caplog.text and ALIGNMENT_FILE in caplog.text


def test_a_damaged_or_wrong_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "SadTalker").mkdir()
    for text in ("not weights", "hello", ""):
        (tmp_path / "SadTalker" / DETECTOR_FILE).write_text(text, encoding="utf-8")
        with pytest.raises(SadTalkerCheckpointError, match=f"{DETECTOR_FILE} could not be read") as error:
            create_landmarker(tmp_path)
        assert "facexlib" in str(error.value)
    (tmp_path / "SadTalker" / DETECTOR_FILE).unlink()
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2)}}, tmp_path / "SadTalker" / ALIGNMENT_FILE)
    with pytest.raises(
        SadTalkerCheckpointError, match=f"{ALIGNMENT_FILE} does not hold the weights"
    ) as error:
        create_landmarker(tmp_path)
    assert "missing keys" in str(error.value) and "unexpected keys: conv1.weight" in str(error.value)
    torch.save([1, 2], tmp_path / "SadTalker" / ALIGNMENT_FILE)
    with pytest.raises(SadTalkerCheckpointError, match=f"{ALIGNMENT_FILE} holds a list"):
        create_landmarker(tmp_path)
    torch.save({"state_dict": {}, "options": logging.LogRecord}, tmp_path / "SadTalker" / ALIGNMENT_FILE)
    with pytest.raises(SadTalkerCheckpointError, match=f"{ALIGNMENT_FILE} was not loaded: .*could run code"):
        create_landmarker(tmp_path)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)


@pytest.mark.parametrize("variant", ["prefixed", "wrapped", "no counters", "half"])
def test_loading_accepts_the_wrappings_of_real_files(tmp_path: Path, variant: str) -> None:
    torch.manual_seed(1)
    state = TinyNet().state_dict()
    if variant == "no counters":
        state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    if variant == "half":
        state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    saved: object = (
        {f"module.{key}": value for key, value in state.items()} if variant == "prefixed" else state
    )
    if variant == "wrapped":
        saved = {"state_dict": state, "epoch": 3}
    torch.save(saved, tmp_path / "tiny.pth")
    network = load_network(tmp_path / "tiny.pth", TinyNet, "tiny network", "cpu")
    assert network.conv.weight.dtype == torch.float32 and not network.conv.weight.is_meta
    torch.testing.assert_close(network.conv.weight, state["conv.weight"].float())
    assert int(network.bn.num_batches_tracked) == 0


# --- decoding -------------------------------------------------------------------------------------


def test_prior_boxes_cover_three_strides_with_two_sizes() -> None:
    priors = prior_boxes(64, 96)
    # Stride 8: 8 x 12 cells, 16: 4 x 6, 32: 2 x 3; two anchors each.
    assert priors.shape == (2 * (8 * 12 + 4 * 6 + 2 * 3), 4)
    expected = {
        0: (4 / 96, 4 / 64, 16 / 96, 16 / 64),
        1: (4 / 96, 4 / 64, 32 / 96, 32 / 64),
        2: (12 / 96, 4 / 64, 16 / 96, 16 / 64),  # next column
        24: (4 / 96, 12 / 64, 16 / 96, 16 / 64),  # next row (12 columns x 2 anchors)
        192: (8 / 96, 8 / 64, 64 / 96, 64 / 64),  # first stride-16 anchor
        251: (80 / 96, 48 / 64, 512 / 96, 512 / 64),  # last stride-32 anchor
    }
    for index, values in expected.items():
        torch.testing.assert_close(priors[index], torch.tensor(values), rtol=0, atol=1e-6)


def test_the_heads_give_one_prediction_per_prior(full_landmarker: NetworkLandmarker) -> None:
    network = full_landmarker.find_face.detector.network  # type: ignore[attr-defined]
    with torch.no_grad():
        boxes, logits, points = network(torch.zeros(1, 3, 45, 70))
    count = prior_boxes(45, 70).shape[0]
    assert count == 2 * (math.ceil(45 / 8) * math.ceil(70 / 8) + 3 * 5 + 2 * 3)
    assert boxes.shape == (1, count, 4) and logits.shape == (1, count, 2) and points.shape == (1, count, 10)


def test_box_and_point_decoding() -> None:
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    box = decode_boxes(torch.tensor([[1.0, -1.0, 0.0, math.log(2) / 0.2]]), prior)
    # Centre moves by 0.1 x prior size: (0.52, 0.46); height doubles to 0.8, width stays 0.2.
    torch.testing.assert_close(box, torch.tensor([[0.42, 0.06, 0.62, 0.86]]))
    points = decode_points(torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0, -1.0, 2.0, 0.0, 0.0, -2.0]]), prior)
    expected = [[0.52, 0.5], [0.5, 0.54], [0.48, 0.46], [0.54, 0.5], [0.5, 0.42]]
    torch.testing.assert_close(points, torch.tensor([expected]))


def test_nms_keeps_the_better_of_two_overlapping_boxes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    kept = non_maximum_suppression(boxes, torch.tensor([0.9, 0.95, 0.99]), 0.4)
    assert kept.tolist() == [2, 1]


class ScriptedRetinaFace(nn.Module):
    """Outputs chosen per anchor (zero offsets: each box is its prior), recording its input."""

    def __init__(self, scores: dict[int, float]) -> None:
        super().__init__()
        self.scores = scores
        self.seen: torch.Tensor | None = None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.seen = image
        count = prior_boxes(*image.shape[-2:]).shape[0]
        logits = torch.zeros(1, count, 2)
        logits[0, :, 0] = 20.0
        for index, score in self.scores.items():
            logits[0, index] = torch.tensor([0.0, math.log(score / (1 - score))])
        return torch.zeros(1, count, 4), logits, torch.zeros(1, count, 10)


def test_detector_thresholds_decodes_to_pixels_and_picks_the_largest_face() -> None:
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[0, 0] = (200, 100, 50)  # RGB
    # 0 / 2: small overlapping-free anchors; 192: a big stride-16 anchor; 193: even bigger, too unsure.
    network = ScriptedRetinaFace({0: 0.99, 2: 0.98, 192: 0.975, 193: 0.9})
    detector = RetinaFaceDetector(network, "cpu")  # type: ignore[arg-type]
    faces = detector.detect(image)
    assert [round(face.score, 3) for face in faces] == [0.99, 0.98, 0.975]
    # Anchor 0: centre (4, 4), 16 x 16 pixels, clipped to the photo.
    assert faces[0].box == pytest.approx((0.0, 0.0, 12.0, 12.0))
    np.testing.assert_allclose(faces[0].five_points, np.tile([[4.0, 4.0]], (5, 1)))
    largest = detector.largest_face(image)
    assert largest is not None and largest.box == pytest.approx((0.0, 0.0, 40.0, 40.0))
    # Input: BGR, mean-subtracted, not scaled.
    assert network.seen is not None
    b, g, r = BGR_MEAN
    torch.testing.assert_close(network.seen[0, :, 0, 0], torch.tensor([50 - b, 100 - g, 200 - r]))
    # A photo larger than the limit is detected downscaled; boxes come back in photo pixels.
    small = RetinaFaceDetector(ScriptedRetinaFace({0: 0.99}), "cpu", max_side=48)  # type: ignore[arg-type]
    face = small.largest_face(image)
    assert face is not None and face.box == pytest.approx((0.0, 0.0, 24.0, 24.0))
    assert RetinaFaceDetector(ScriptedRetinaFace({}), "cpu").largest_face(image) is None  # type: ignore[arg-type]


def test_heatmap_peak_is_read_to_a_quarter_cell() -> None:
    ys, xs = np.mgrid[0:64, 0:64]
    centres = [(20.3, 41.8), (7.0, 7.0), (0.2, 63.0)]
    heatmaps = np.stack([np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 1.5**2)) for cx, cy in centres])
    points = heatmap_points(heatmaps)
    # Peak cell (20, 42), moved towards the larger neighbours (+x, -y), plus half a cell.
    np.testing.assert_allclose(points[0], [20.75, 42.25])
    np.testing.assert_allclose(points[0], np.array(centres[0]) + 0.5, atol=0.25)
    np.testing.assert_allclose(points[1], [7.5, 7.5])  # symmetric neighbours: no move
    # Peak on the border: the missing neighbour counts as the lowest value, so the point moves inwards.
    np.testing.assert_allclose(points[2], [0.75, 63.25])


def test_98_to_68_conversion() -> None:
    wflw = np.stack([np.arange(98), 1000 + np.arange(98)], axis=1).astype(np.float32)
    ibug = landmarks_98_to_68(wflw)
    assert ibug.shape == (68, 2)
    single = {0: 0, 8: 16, 16: 32, 17: 33, 26: 46, 27: 51, 35: 59, 36: 60, 38: 63, 39: 64, 41: 67}
    single |= {42: 68, 44: 71, 45: 72, 47: 75, 48: 76, 57: 85, 67: 95}
    for ibug_index, wflw_index in single.items():
        np.testing.assert_array_equal(ibug[ibug_index], wflw[wflw_index])
    for ibug_index, (a, b) in {18: (34, 41), 21: (37, 38), 22: (42, 50), 25: (45, 47)}.items():
        np.testing.assert_array_equal(ibug[ibug_index], (wflw[a] + wflw[b]) / 2)


# --- end to end ---------------------------------------------------------------------------------


def test_prepare_face_with_random_networks_finds_a_face_or_says_none(
    full_landmarker: NetworkLandmarker, astronaut_png: Path
) -> None:
    photo = load_image(astronaut_png)
    try:
        face = prepare_face(photo, "crop", 256, full_landmarker)
    except NoFaceError as error:
        assert "face" in str(error)
    else:
        assert face.image.shape == (256, 256, 3) and face.landmarks.shape == (68, 2)


def test_fan_places_68_points_inside_the_detected_box(
    full_landmarker: NetworkLandmarker, astronaut_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = load_image(astronaut_png)
    box = (150.4, 40.9, 330.2, 250.7)
    monkeypatch.setattr(full_landmarker, "find_face", lambda image: (box, None))
    points = full_landmarker.landmarks(photo)
    assert points is not None and points.shape == (68, 2) and np.isfinite(points).all()
    assert np.all((points >= [150, 40]) & (points <= [330, 250]))
    # Random weights may place the points anyhow: a crop, or the clear "face too small" error.
    try:
        face = prepare_face(photo, "extcrop", 256, full_landmarker, landmarks=points)
    except NoFaceError as error:
        assert "face" in str(error)
    else:
        assert face.image.shape == (256, 256, 3) and face.landmarks.shape == (68, 2)


def test_template_follows_retinaface_five_points(full_landmarker: NetworkLandmarker) -> None:
    landmarker = NetworkLandmarker("retinaface-template", full_landmarker.find_face)
    template = landmarker.template
    angle, scale, shift = 0.2, 180.0, np.array([100.0, 60.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    expected = template @ rotation.T * scale + shift
    five = landmarker.template_five @ rotation.T * scale + shift
    landmarker.find_face = lambda image: ((0.0, 0.0, 1.0, 1.0), five)
    points = landmarker.landmarks(np.zeros((8, 8, 3), dtype=np.uint8))
    assert points is not None
    np.testing.assert_allclose(points, expected, atol=1e-3)
