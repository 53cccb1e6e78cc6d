"""Crop geometry, landmark mapping, paste-back and the 3DMM alignment, against hand-derived values."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from sadtalker.errors import ImageFileError, NoFaceError, VideoFileError
from sadtalker.preprocess import (
    CropGeometry,
    HaarTemplateLandmarker,
    align_for_reconstruction,
    create_landmarker,
    crop_geometry,
    even_size,
    fit_scaled_projection,
    five_point_template,
    five_points,
    load_image,
    map_points_to_region,
    output_frame_size,
    prepare_face,
    read_video_frames,
    reference_video_coefficients,
)
from sadtalker.video import H264Writer, fit_frame, paste_into_photo
from tests.sadtalker.helpers import write_wav


def upright_face(eye_y: float, eye_left_x: float, eye_right_x: float, mouth_y: float) -> np.ndarray:
    """68 landmarks where only the points the crop uses matter: eyes (36-47) and mouth corners (48, 54)."""
    points = np.zeros((68, 2))
    points[36:42] = (eye_left_x, eye_y)
    points[42:48] = (eye_right_x, eye_y)
    centre = (eye_left_x + eye_right_x) / 2
    points[48] = (centre - 20, mouth_y)
    points[54] = (centre + 20, mouth_y)
    return points


class FixedLandmarker:
    name = "fixed"

    def __init__(self, points: np.ndarray | None) -> None:
        self.points = points

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        return self.points


def test_crop_geometry_of_an_upright_face() -> None:
    # Eyes 60 px apart at y=200, mouth 80 px below: x = (60, 0) - rot90((0, 80)) = (60, 0) + (80, 0)...
    # normalised then scaled to max(2 * 60, 1.8 * 80) = 144; the quad is a 288-px square centred
    # 8 px below the eyes (0.1 of the eye-to-mouth vector); border = rint(28.8) = 29.
    landmarks = upright_face(eye_y=200, eye_left_x=370, eye_right_x=430, mouth_y=280)
    geometry = crop_geometry(landmarks, (800, 600))
    assert geometry.shrink == 1 and geometry.shrunk_size == (800, 600)
    centre = np.array([400.0, 208.0])
    low, high = centre - 144, centre + 144  # (256, 64) .. (544, 352)
    assert geometry.crop_box == (256 - 29, 64 - 29, 544 + 29, 352 + 29)
    # Quad box relative to the crop, +0.5 then truncated: 29.5 -> 29, 29 + 288 + 0.5 -> 317.
    assert geometry.quad_box == (29, 29, 317, 317)
    assert geometry.region(extended=False) == (256, 64, 544, 352)
    assert geometry.region(extended=True) == geometry.crop_box
    assert geometry.region_in_photo(False) == (int(low[0]), int(low[1]), int(high[0]), int(high[1]))


def test_crop_geometry_is_clipped_at_the_photo_edges() -> None:
    landmarks = upright_face(eye_y=40, eye_left_x=30, eye_right_x=90, mouth_y=120)
    geometry = crop_geometry(landmarks, (400, 300))
    assert geometry.crop_box[:2] == (0, 0)
    x1, y1, x2, y2 = geometry.region(extended=False)
    assert x1 >= 0 and y1 >= 0 and x2 <= 400 and y2 <= 300 and x2 > x1 and y2 > y1


def test_huge_faces_are_measured_on_a_shrunk_photo_and_pasted_back_at_full_size() -> None:
    # Eyes 600 px apart, mouth 800 px below: half-side max(1200, 1440) -> the quad's side is 2880 px,
    # over 4 x 512, so the photo is shrunk by floor(2880 / 512 / 2) = 2 and the side becomes 1440.
    landmarks = upright_face(eye_y=1500, eye_left_x=1700, eye_right_x=2300, mouth_y=2300)
    geometry = crop_geometry(landmarks, (4000, 3200))
    assert geometry.shrink == 2 and geometry.shrunk_size == (2000, 1600)
    x1, y1, x2, y2 = geometry.region(extended=False)
    assert (x2 - x1) == pytest.approx(1440, abs=1)
    assert geometry.region_in_photo(False) == (2 * x1, 2 * y1, 2 * x2, 2 * y2)
    # The photo landmarks land where they should in a 256 crop of that region.
    mapped = map_points_to_region(landmarks[[36, 42]], (x1, y1, x2, y2), 2, 256)
    assert mapped[0, 0] < mapped[1, 0] and abs(mapped[0, 1] - mapped[1, 1]) < 1e-3
    assert (mapped[1, 0] - mapped[0, 0]) == pytest.approx(300 * 256 / (x2 - x1), rel=1e-3)


def test_point_mapping_follows_cv2_resize() -> None:
    image = np.zeros((90, 120, 3), dtype=np.uint8)
    image[40, 70] = 255
    region = (10, 20, 110, 80)
    resized = cv2.resize(image[20:80, 10:110], (256, 256))
    expected = map_points_to_region(np.array([[70.0, 40.0]]), region, 1, 256)[0]
    weights = resized[..., 0].astype(float)
    ys, xs = np.indices(weights.shape)
    centroid = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.05)


def test_prepare_face_modes_on_the_astronaut(astronaut_png: Path) -> None:
    photo = load_image(astronaut_png)
    landmarker = HaarTemplateLandmarker()
    points = landmarker.landmarks(photo)
    assert points is not None and points.shape == (68, 2)
    eyes = five_points(points)[:2]
    assert 150 < eyes[:, 0].min() < eyes[:, 0].max() < 300 and 80 < eyes[:, 1].mean() < 130
    faces = {
        mode: prepare_face(photo, mode, 256, landmarker) for mode in ("crop", "extcrop", "resize", "full")
    }
    for face in faces.values():
        assert face.image.shape == (256, 256, 3) and face.landmarks.shape == (68, 2)
    x1, y1, x2, y2 = faces["crop"].region
    ex1, ey1, ex2, ey2 = faces["extcrop"].region
    assert ex1 <= x1 < x2 <= ex2 and ey1 <= y1 < y2 <= ey2
    assert faces["resize"].region == (0, 0, 512, 512)
    assert faces["full"].region == faces["crop"].region
    assert output_frame_size(faces["resize"]) == (256, 256)
    assert output_frame_size(faces["full"]) == (512, 512)
    # The crop shows the face: its landmarks sit in the middle of the 256-pixel image.
    centre = faces["crop"].landmarks.mean(axis=0)
    assert np.all(np.abs(centre - 128) < 40)


def test_no_face_is_a_clear_error() -> None:
    blank = np.full((200, 300, 3), 127, dtype=np.uint8)
    with pytest.raises(NoFaceError, match="No face was found in the reference video"):
        prepare_face(blank, "crop", 256, HaarTemplateLandmarker(), what="the reference video")
    assert HaarTemplateLandmarker().landmarks(blank) is None


def test_unreadable_images(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match="was not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageFileError, match="could not be read as an image"):
        load_image(tmp_path / "empty.png")
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((10, 12), 90, dtype=np.uint8))
    assert load_image(grey).shape == (10, 12, 3)


def test_landmarker_without_network_files_warns_and_names_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The network combinations are tested in test_face_networks.py.
    with caplog.at_level("WARNING"):
        landmarker = create_landmarker(tmp_path)
    assert landmarker.name == "haar-template"
    assert "detection_Resnet50_Final.pth" in caplog.text and "alignment_WFLW_4HG.pth" in caplog.text


def test_five_points_and_the_template() -> None:
    points = np.arange(136, dtype=np.float64).reshape(68, 2)
    five = five_points(points)
    np.testing.assert_array_equal(five[0], (points[36] + points[39]) / 2)
    np.testing.assert_array_equal(five[1], (points[42] + points[45]) / 2)
    np.testing.assert_array_equal(five[2:], points[[30, 48, 54]])
    template = five_point_template()
    assert template.shape == (5, 3)
    assert template[0, 0] < 0 < template[1, 0]  # left eye, right eye
    assert template[3, 1] < template[2, 1] < template[0, 1]  # mouth below nose below eyes (y up)


def test_scaled_projection_fit_recovers_scale_and_translation() -> None:
    template = five_point_template()
    points = 80.0 * template[:, :2] + np.array([120.0, 95.0])
    translation, scale = fit_scaled_projection(points, template)
    assert scale == pytest.approx(80.0, rel=1e-6)
    np.testing.assert_allclose(translation, [120.0, 95.0], atol=1e-6)


def test_alignment_puts_the_face_where_the_template_is() -> None:
    # A 256 image whose 5 points are the template scaled by 60 about (128, 120) (y up).
    template = five_point_template()
    landmarks = np.zeros((68, 2))
    five_up = 60.0 * template[:, :2] + np.array([128.0, 120.0])
    five_down = np.stack([five_up[:, 0], 255 - five_up[:, 1]], axis=1)
    for (a, b), point in zip(((36, 39), (42, 45)), five_down[:2], strict=True):
        landmarks[a] = landmarks[b] = point
    landmarks[[30, 48, 54]] = five_down[2:]
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    aligned, params = align_for_reconstruction(image, landmarks)
    assert aligned.shape == (224, 224, 3) and aligned.dtype == np.uint8
    scale = 102 / 60
    np.testing.assert_allclose(params, [256, 256, scale, 128, 120], rtol=1e-5)


def test_even_sizes_and_frame_fitting() -> None:
    assert even_size(256, 257.6) == (256, 258)
    assert even_size(255, 1) == (256, 2)
    odd = np.zeros((401, 481, 3), dtype=np.uint8)
    assert fit_frame(odd, 480, 400).shape == (400, 480, 3)
    assert fit_frame(odd, 240, 200).shape == (200, 240, 3)


def test_paste_back_blends_inside_the_region_only() -> None:
    # As in use: the rendered face is the photo's region with something changed inside (a bright
    # square standing for the moving mouth).
    ys, xs = np.indices((120, 160))
    photo = np.repeat((60 + 0.5 * xs + 0.3 * ys).astype(np.uint8)[..., None], 3, axis=2)
    region = (50, 30, 110, 90)
    face = photo[30:90, 50:110].copy()
    face[25:35, 25:35] = 250
    pasted = paste_into_photo(face, photo, region)
    assert pasted.shape == photo.shape
    outside = np.ones(photo.shape[:2], dtype=bool)
    outside[30:90, 50:110] = False
    np.testing.assert_array_equal(pasted[outside], photo[outside])
    assert pasted[60, 80].mean() > 200  # the change shows
    inside_unchanged = np.abs(pasted[35:45, 55:65].astype(int) - photo[35:45, 55:65].astype(int))
    assert inside_unchanged.max() <= 12  # elsewhere the region still matches the photo
    whole = paste_into_photo(photo, photo, (0, 0, 160, 120))  # a region touching every edge
    assert np.abs(whole.astype(int) - photo.astype(int)).max() <= 2


def test_crop_geometry_dataclass_region_in_photo_is_clipped() -> None:
    geometry = CropGeometry(
        image_size=(101, 99), shrink=2, shrunk_size=(50, 50), crop_box=(0, 0, 50, 50), quad_box=(5, 5, 50, 50)
    )
    assert geometry.region_in_photo(extended=True) == (0, 0, 100, 99)
    assert geometry.region_in_photo(extended=False) == (10, 10, 100, 99)


def test_given_landmarks_skip_detection() -> None:
    photo = np.full((600, 800, 3), 90, dtype=np.uint8)
    landmarks = upright_face(eye_y=200, eye_left_x=370, eye_right_x=430, mouth_y=280)
    face = prepare_face(photo, "crop", 256, FixedLandmarker(None), landmarks=landmarks)
    assert face.region == (256, 64, 544, 352) and face.region_size == (288, 288)
    with pytest.raises(NoFaceError):
        prepare_face(photo, "crop", 256, FixedLandmarker(None))


def test_reference_video_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoFileError, match="was not found"):
        list(read_video_frames(tmp_path / "missing.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoFileError, match="could not be read as a video"):
        list(read_video_frames(text))
    with pytest.raises(VideoFileError, match="has no video track"):
        list(read_video_frames(write_wav(tmp_path / "speech.wav", np.zeros(1600))))

    faceless = tmp_path / "wall.mp4"
    with H264Writer(faceless, 64, 48) as writer:
        for _ in range(4):
            writer.write(np.full((48, 64, 3), 100, dtype=np.uint8))
    assert len(list(read_video_frames(faceless, max_frames=2))) == 2
    with pytest.raises(NoFaceError, match=r"first frame of the reference video wall\.mp4"):
        landmarker = HaarTemplateLandmarker()
        reference_video_coefficients(faceless, "crop", landmarker, None, "cpu")  # type: ignore[arg-type]
