"""Portrait -> the face crop the renderer animates, its landmarks, and its 3DMM source coefficients.

Steps, as the reference pipeline does them (facts from OpenTalker/SadTalker ``src/utils/croper.py``,
``src/utils/preprocess.py`` and ``src/face3d/util/preprocess.py``):

1. 68 facial landmarks on the photo.
2. Crop geometry from the landmarks (the FFHQ-style oriented quad): eye centres ``e_l``/``e_r`` (means
   of points 36-41 / 42-47), mouth corners 48/54; ``x = (e_r - e_l) - rot90(m - e)``, scaled to
   ``max(2 |e_r - e_l|, 1.8 |m - e|)``; centre ``e + 0.1 (m - e)``; the quad's side is ``2 |x|``.
   Photos whose quad exceeds 4x the 512-pixel working size are first shrunk by an integer factor;
   a border of ``max(rint(0.1 side), 3)`` pixels is added around the quad (clamped to the photo).
3. The region shown to the renderer: ``crop``/``full`` = the quad's box, ``extcrop``/``extfull`` =
   the bordered box, ``resize`` = the whole photo; resized (bilinear) to ``size x size``.
4. 3DMM coefficients: the five standard points (eye centres, nose tip 30, mouth corners) of the
   crop's landmarks are fitted to the 3-D face model's template with a least-squares scaled
   projection; the crop is rescaled so the face has the template's size (102 / scale), cut to
   224 x 224 around it, and fed to the reconstruction network. The source description keeps
   expression (64), angles (3) and translation (3) plus the alignment's scale and shift (3).

Landmarks come from a :class:`FaceLandmarker`. As the reference, facexlib's RetinaFace finds the face
(``detection_Resnet50_Final.pth``, :mod:`sadtalker.face_detection`) and the 98-point AWing FAN places the
points in its box (``alignment_WFLW_4HG.pth``, :mod:`sadtalker.face_alignment`), converted to 68; the
files are looked for in ``models/SadTalker`` then ``models/GFPGAN``. Without the detector file OpenCV's
bundled Haar cascade finds the box; without the landmark file the 68 points come from a mean frontal
face template (``configs/sadtalker/haar_mean_face_68.json``), fitted to RetinaFace's five points or
placed in the Haar box. The template is an estimate (no expression; with Haar no head rotation either).

Deviations from the reference, on purpose: landmarks are detected once on the photo and mapped into
the crop (the reference detects a second time on the resized crop); the paste-back region is mapped
back through the shrink factor and clipped to the photo (the reference ignored both); a photo without a
face raises :class:`NoFaceError` in every mode (the reference crashed in the crop modes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from sadtalker.errors import ImageFileError, NoFaceError, VideoFileError
from sadtalker.ffmpeg import stderr_tail

if TYPE_CHECKING:
    import torch

    from sadtalker.face_alignment import AwingAligner
    from sadtalker.face_detection import RetinaFaceDetector
    from sadtalker.networks.face_recon import FaceReconstructionNet

logger = logging.getLogger(__name__)

PreprocessMode = Literal["crop", "extcrop", "resize", "full", "extfull"]
PREPROCESS_MODES: tuple[str, ...] = ("crop", "extcrop", "resize", "full", "extfull")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sadtalker"
MEAN_FACE_FILE = CONFIG_DIR / "haar_mean_face_68.json"
FIVE_POINT_TEMPLATE_FILE = CONFIG_DIR / "bfm_five_point_template.json"

# The reference's crop working size (``xsize=512``): photos are shrunk when the quad is >= 4x this.
CROP_WORKING_SIZE = 512
# Face-reconstruction input: 224 x 224, the face scaled so the template's 5 points span 102 units.
RECON_SIZE = 224
RECON_RESCALE = 102.0
# Reference videos are cropped and measured at 256 pixels whatever the render size.
REFERENCE_VIDEO_SIZE = 256
# Landmark files of the reference's detector (facexlib) that may sit in models/SadTalker or models/GFPGAN.
FACEXLIB_DETECTOR_FILE = "detection_Resnet50_Final.pth"
FACEXLIB_ALIGNMENT_FILE = "alignment_WFLW_4HG.pth"
LANDMARK_FOLDERS = ("SadTalker", "GFPGAN")
# 68-point indices (0-based) used by the alignment.
_LEFT_EYE = slice(36, 42)
_RIGHT_EYE = slice(42, 48)
_MOUTH_LEFT, _MOUTH_RIGHT, _NOSE_TIP = 48, 54, 30
_EYE_CORNERS = ((36, 39), (42, 45))
_RECON_BATCH = 8

Box = tuple[int, int, int, int]


# --- landmarks ----------------------------------------------------------------------------------


class FaceLandmarker(Protocol):
    """Finds one face in an RGB photo and returns its 68 landmarks ``(68, 2)`` (x, y pixels), or ``None``."""

    name: str

    def landmarks(self, image: np.ndarray) -> np.ndarray | None: ...


def _mean_face() -> np.ndarray:
    data = json.loads(MEAN_FACE_FILE.read_text(encoding="utf-8"))
    points = np.asarray(data["points"], dtype=np.float32)
    if points.shape != (68, 2):
        raise ValueError(f"{MEAN_FACE_FILE} must hold 68 [x, y] points")
    return points


def five_point_template() -> np.ndarray:
    """The 3-D face model's 5 standard points ``(5, 3)`` (eye centres, nose tip, mouth corners)."""
    data = json.loads(FIVE_POINT_TEMPLATE_FILE.read_text(encoding="utf-8"))
    points = np.asarray(data["points"], dtype=np.float64)
    if points.shape != (5, 3):
        raise ValueError(f"{FIVE_POINT_TEMPLATE_FILE} must hold 5 [x, y, z] points")
    return points


class HaarTemplateLandmarker:
    """OpenCV's frontal-face Haar cascade for the box, a mean-face template for the 68 points.

    Of several detections the largest face wins (the portrait's subject is normally the biggest).
    """

    name = "haar-template"

    def __init__(self) -> None:
        import cv2

        cascade_path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(cascade_path))
        if self._cascade.empty():
            raise NoFaceError(
                f"OpenCV's face detector could not be loaded from {cascade_path}. "
                "Reinstall opencv-python-headless (pip install -r requirements.txt)."
            )
        self._template = _mean_face()

    def face_box(self, image: np.ndarray) -> tuple[int, int, int, int] | None:
        """``(x, y, w, h)`` of the largest frontal face, or ``None``."""
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        smallest = max(24, min(gray.shape) // 16)
        faces = self._cascade.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest)
        )
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda face: int(face[2]) * int(face[3]))
        return int(x), int(y), int(w), int(h)

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        box = self.face_box(image)
        if box is None:
            return None
        x, y, w, h = box
        return (
            self._template * np.array([w, h], dtype=np.float32) + np.array([x, y], dtype=np.float32)
        ).astype(np.float32)


# The Haar box ends just above the chin (the template's chin is at 1.06 box heights); the AWing FAN was
# run on RetinaFace boxes, which include the chin, so the Haar box is extended downwards for it.
HAAR_BOX_BOTTOM_FOR_FAN = 1.12
# Template points matched to RetinaFace's five: eye centres (eye contour means), nose tip, mouth corners.
_TEMPLATE_FIVE = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))

FaceFinder = Callable[[np.ndarray], "tuple[tuple[float, float, float, float], np.ndarray | None] | None"]


def fit_template_to_points(
    template: np.ndarray, template_five: np.ndarray, five: np.ndarray
) -> np.ndarray | None:
    """The template moved by the least-squares similarity (scale, rotation, shift) taking its five points
    onto ``five``; ``None`` when the fit degenerates (non-finite points, no scale)."""
    source = np.asarray(template_five, dtype=np.float64)
    target = np.asarray(five, dtype=np.float64)
    if not np.isfinite(target).all():
        return None
    # x' = a x - b y + tx, y' = b x + a y + ty, solved for (a, b, tx, ty).
    system = np.zeros((2 * len(source), 4))
    system[0::2] = np.column_stack([source[:, 0], -source[:, 1], np.ones(len(source)), np.zeros(len(source))])
    system[1::2] = np.column_stack([source[:, 1], source[:, 0], np.zeros(len(source)), np.ones(len(source))])
    (a, b, tx, ty), *_ = np.linalg.lstsq(system, target.reshape(-1), rcond=None)
    if not np.isfinite([a, b, tx, ty]).all() or np.hypot(a, b) < 1e-6:
        return None
    points = np.asarray(template, dtype=np.float64)
    moved = np.column_stack(
        [a * points[:, 0] - b * points[:, 1] + tx, b * points[:, 0] + a * points[:, 1] + ty]
    )
    return moved.astype(np.float32)


class NetworkLandmarker:
    """A face finder (RetinaFace, or the Haar cascade) and a way to place the 68 points in its face.

    ``aligner`` is the AWing FAN (:class:`sadtalker.face_alignment.AwingAligner`); without it the mean-face
    template is fitted to the finder's five points, or placed in its box when it gives none (Haar).
    """

    def __init__(self, name: str, find_face: FaceFinder, aligner: AwingAligner | None = None) -> None:
        self.name = name
        self.find_face = find_face
        self.aligner = aligner
        self.template = _mean_face()
        self.template_five = np.stack([self.template[list(group)].mean(axis=0) for group in _TEMPLATE_FIVE])

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        found = self.find_face(image)
        if found is None:
            return None
        box, five = found
        if self.aligner is not None:
            return self.aligner.landmarks_68(image, box)
        if five is not None:
            fitted = fit_template_to_points(self.template, self.template_five, five)
            if fitted is not None:
                return fitted
        x1, y1, x2, y2 = box
        size = np.array([x2 - x1, y2 - y1], dtype=np.float32)
        return (self.template * size + np.array([x1, y1], dtype=np.float32)).astype(np.float32)


class RetinaFaceFinder:
    """The largest RetinaFace face as ``(box, five points)``."""

    def __init__(self, detector: RetinaFaceDetector) -> None:
        self.detector = detector

    def __call__(
        self, image: np.ndarray
    ) -> tuple[tuple[float, float, float, float], np.ndarray | None] | None:
        face = self.detector.largest_face(image)
        return None if face is None else (face.box, face.five_points)


class HaarFinder:
    """The largest Haar face as ``(box, None)``, its bottom moved to ``bottom`` box heights."""

    def __init__(self, haar: HaarTemplateLandmarker, bottom: float = 1.0) -> None:
        self.haar = haar
        self.bottom = bottom

    def __call__(
        self, image: np.ndarray
    ) -> tuple[tuple[float, float, float, float], np.ndarray | None] | None:
        found = self.haar.face_box(image)
        if found is None:
            return None
        x, y, w, h = found
        return (float(x), float(y), float(x + w), float(y + h * self.bottom)), None


def find_landmark_file(models_dir: Path | None, name: str) -> Path | None:
    """``models_dir/<folder>/name`` for the first of :data:`LANDMARK_FOLDERS` that has it."""
    if models_dir is None:
        return None
    for folder in LANDMARK_FOLDERS:
        path = Path(models_dir) / folder / name
        if path.is_file():
            return path
    return None


def create_landmarker(models_dir: Path | None, device: torch.device | str | None = None) -> FaceLandmarker:
    """The best landmark detector the files in ``models_dir`` allow (the networks run on ``device``).

    Both facexlib files: RetinaFace + AWing FAN (``retinaface-awing``, the reference's); the detector
    only: RetinaFace + the template on its five points (``retinaface-template``); the landmark network
    only: Haar box + AWing FAN (``haar-awing``); neither: Haar + the template in its box
    (``haar-template``). Each fallback logs a warning saying which file to add. A present but unreadable
    or wrong file raises :class:`SadTalkerCheckpointError` naming it.
    """
    detector_path = find_landmark_file(models_dir, FACEXLIB_DETECTOR_FILE)
    alignment_path = find_landmark_file(models_dir, FACEXLIB_ALIGNMENT_FILE)
    where = "models/" + " or models/".join(LANDMARK_FOLDERS)
    if detector_path is None and alignment_path is None:
        logger.warning(
            "Using OpenCV's Haar face detector with a mean-face landmark template for the talking head: "
            "crops and head poses are estimates. For the reference's landmarks put facexlib's %s and %s "
            "in %s.",
            FACEXLIB_DETECTOR_FILE,
            FACEXLIB_ALIGNMENT_FILE,
            where,
        )
        return HaarTemplateLandmarker()

    run_on = device if device is not None else "cpu"
    aligner = None
    if alignment_path is not None:
        from sadtalker.face_alignment import load_awing

        aligner = load_awing(alignment_path, run_on)
    if detector_path is None:
        logger.warning(
            "%s was not found in %s: faces are found with OpenCV's Haar detector (frontal faces only) and "
            "the landmarks placed by %s.",
            FACEXLIB_DETECTOR_FILE,
            where,
            alignment_path,
        )
        return NetworkLandmarker(
            "haar-awing", HaarFinder(HaarTemplateLandmarker(), HAAR_BOX_BOTTOM_FOR_FAN), aligner
        )

    from sadtalker.face_detection import load_retinaface

    detector = load_retinaface(detector_path, run_on)
    if aligner is None:
        logger.warning(
            "%s was not found in %s: the 68 face landmarks are estimated by fitting a frontal-face template "
            "to the face found by %s (no expression; less precise crops and head poses).",
            FACEXLIB_ALIGNMENT_FILE,
            where,
            detector_path,
        )
        return NetworkLandmarker("retinaface-template", RetinaFaceFinder(detector))
    logger.info(
        "Face landmarks: RetinaFace (%s) + AWing FAN (%s) on %s.", detector_path, alignment_path, run_on
    )
    return NetworkLandmarker("retinaface-awing", RetinaFaceFinder(detector), aligner)


# --- crop geometry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropGeometry:
    """Where the face is, in the reference's terms.

    ``shrink`` is the integer factor the photo is first reduced by (1 for most photos);
    ``crop_box`` ``(x1, y1, x2, y2)`` is the bordered box in the shrunk photo, ``quad_box`` the quad's
    box relative to ``crop_box`` (already clipped to it).
    """

    image_size: tuple[int, int]  # (width, height) of the photo
    shrink: int
    shrunk_size: tuple[int, int]
    crop_box: Box
    quad_box: Box

    def region(self, extended: bool) -> Box:
        """The shown region in shrunk-photo pixels: the bordered box, or the quad's box."""
        if extended:
            return self.crop_box
        x1, y1 = self.crop_box[:2]
        lx, ly, rx, ry = self.quad_box
        return (x1 + lx, y1 + ly, x1 + rx, y1 + ry)

    def region_in_photo(self, extended: bool) -> Box:
        """The shown region in the original photo's pixels (for pasting the video back)."""
        width, height = self.image_size
        x1, y1, x2, y2 = (value * self.shrink for value in self.region(extended))
        return (max(0, x1), max(0, y1), min(width, x2), min(height, y2))


def crop_geometry(landmarks: np.ndarray, image_size: tuple[int, int]) -> CropGeometry:
    """The reference's oriented-quad crop (``align_face``) for 68 landmarks on a ``(width, height)`` photo."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left = lm[_LEFT_EYE].mean(axis=0)
    eye_right = lm[_RIGHT_EYE].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[_MOUTH_LEFT] + lm[_MOUTH_RIGHT]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    centre = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])
    side = np.hypot(*x) * 2

    width, height = image_size
    shrink = int(np.floor(side / CROP_WORKING_SIZE * 0.5))
    if shrink > 1:
        shrunk = (int(np.rint(width / shrink)), int(np.rint(height / shrink)))
        quad /= shrink
        side /= shrink
    else:
        shrink = 1
        shrunk = (width, height)

    border = max(int(np.rint(side * 0.1)), 3)
    crop = (
        max(int(np.floor(quad[:, 0].min())) - border, 0),
        max(int(np.floor(quad[:, 1].min())) - border, 0),
        min(int(np.ceil(quad[:, 0].max())) + border, shrunk[0]),
        min(int(np.ceil(quad[:, 1].max())) + border, shrunk[1]),
    )
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise NoFaceError("The face found lies outside the photo. Use a photo with the whole face visible.")
    quad = quad - np.array(crop[:2], dtype=np.float64) + 0.5
    crop_width, crop_height = crop[2] - crop[0], crop[3] - crop[1]
    # Corners as the reference picks them (left of corners 0/1, top of 0/3, right of 2/3, bottom of
    # 1/2), truncated to ints and clipped to the bordered box.
    left = int(max(min(quad[0, 0], quad[1, 0]), 0))
    top = int(max(min(quad[0, 1], quad[3, 1]), 0))
    right = min(int(max(quad[2, 0], quad[3, 0])), crop_width)
    bottom = min(int(max(quad[1, 1], quad[2, 1])), crop_height)
    if right <= left or bottom <= top:
        raise NoFaceError("The face found is too small to animate. Use a photo where the face is larger.")
    return CropGeometry(
        image_size=(width, height),
        shrink=shrink,
        shrunk_size=shrunk,
        crop_box=crop,
        quad_box=(left, top, right, bottom),
    )


def map_points_to_region(points: np.ndarray, region: Box, shrink: int, size: int) -> np.ndarray:
    """Photo pixel coordinates -> coordinates in the region resized to ``size x size``.

    Uses the pixel-centre convention of ``cv2.resize`` (``(p + 0.5) * scale - 0.5``).
    """
    x1, y1, x2, y2 = region
    scale = np.array([size / (x2 - x1), size / (y2 - y1)], dtype=np.float64)
    shrunk = (np.asarray(points, dtype=np.float64) + 0.5) / shrink - 0.5
    return ((shrunk - np.array([x1, y1]) + 0.5) * scale - 0.5).astype(np.float32)


def _cut_region(image: np.ndarray, geometry: CropGeometry, extended: bool) -> np.ndarray:
    import cv2

    if geometry.shrink > 1:
        image = cv2.resize(image, geometry.shrunk_size)
    x1, y1, x2, y2 = geometry.region(extended)
    return image[y1:y2, x1:x2]


# --- the prepared face ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedFace:
    """A photo ready for the renderer.

    ``image`` is the ``size x size`` RGB crop the renderer animates and ``landmarks`` its 68 points in
    that crop; ``region`` is the photo area the crop shows (original pixels) and ``region_size`` its
    ``(width, height)``, which sets the video's aspect ratio in the crop modes.
    """

    mode: str
    size: int
    image: np.ndarray
    landmarks: np.ndarray
    photo_size: tuple[int, int]
    region: Box
    region_size: tuple[int, int]
    geometry: CropGeometry | None


def load_image(path: Path) -> np.ndarray:
    """Read a photo as RGB uint8 ``(h, w, 3)`` (alpha dropped, grey expanded), with a clear error."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"Image {path} was not found. Check the path of the source portrait.")
    data = np.fromfile(path, dtype=np.uint8)  # cv2.imread cannot open non-ASCII paths on Windows
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageFileError(f"{path.name} could not be read as an image. Use a PNG, JPEG or WebP portrait.")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def prepare_face(
    image: np.ndarray,
    mode: str,
    size: int,
    landmarker: FaceLandmarker,
    *,
    what: str = "the source image",
    landmarks: np.ndarray | None = None,
) -> PreparedFace:
    """Detect the face (unless ``landmarks`` are given) and cut the renderer's input for ``mode``."""
    import cv2

    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {PREPROCESS_MODES}")
    height, width = image.shape[:2]
    if landmarks is None:
        landmarks = landmarker.landmarks(image)
    if landmarks is None:
        raise NoFaceError(
            f"No face was found in {what}. Use a photo with one clearly visible, roughly frontal face "
            "(not too small, not cut off at the edges)."
        )
    if mode == "resize":
        region: Box = (0, 0, width, height)
        face = cv2.resize(image, (size, size))
        mapped = map_points_to_region(landmarks, region, 1, size)
        return PreparedFace(mode, size, face, mapped, (width, height), region, (width, height), None)

    geometry = crop_geometry(landmarks, (width, height))
    extended = mode.startswith("ext")
    cut = _cut_region(image, geometry, extended)
    face = cv2.resize(cut, (size, size))
    shown = geometry.region(extended)
    mapped = map_points_to_region(landmarks, shown, geometry.shrink, size)
    region_size = (shown[2] - shown[0], shown[3] - shown[1])
    return PreparedFace(
        mode, size, face, mapped, (width, height), geometry.region_in_photo(extended), region_size, geometry
    )


# --- 3DMM alignment and coefficients --------------------------------------------------------------


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres (means of the eye corners), nose tip and mouth corners ``(5, 2)`` of 68 landmarks."""
    lm = np.asarray(landmarks, dtype=np.float64)
    (left_a, left_b), (right_a, right_b) = _EYE_CORNERS
    return np.stack(
        [
            (lm[left_a] + lm[left_b]) / 2,
            (lm[right_a] + lm[right_b]) / 2,
            lm[_NOSE_TIP],
            lm[_MOUTH_LEFT],
            lm[_MOUTH_RIGHT],
        ]
    )


def fit_scaled_projection(points: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares ``p = s R X + t`` (R: two free rows) of 2-D ``points`` ``(n, 2)`` on a 3-D ``template``.

    Returns the translation ``t`` ``(2,)`` and the scale ``s`` (mean norm of the two rows).
    """
    count = len(points)
    system = np.zeros((2 * count, 8))
    system[0::2, 0:3] = template
    system[0::2, 3] = 1
    system[1::2, 4:7] = template
    system[1::2, 7] = 1
    solution, *_ = np.linalg.lstsq(system, np.asarray(points, dtype=np.float64).reshape(-1), rcond=None)
    scale = (np.linalg.norm(solution[0:3]) + np.linalg.norm(solution[4:7])) / 2
    return np.array([solution[3], solution[7]]), float(scale)


def align_for_reconstruction(face: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 224 x 224 crop the reconstruction network expects, and ``(w0, h0, s, tx, ty)``.

    ``landmarks`` are the 68 points in ``face`` (y down); the fit works with y up, as the template.
    """
    from PIL import Image

    height, width = face.shape[:2]
    template = five_point_template()
    points = five_points(landmarks)
    points[:, 1] = height - 1 - points[:, 1]
    translation, scale = fit_scaled_projection(points, template)
    scale = RECON_RESCALE / scale

    scaled_width, scaled_height = int(width * scale), int(height * scale)
    left = int(scaled_width / 2 - RECON_SIZE / 2 + (translation[0] - width / 2) * scale)
    top = int(scaled_height / 2 - RECON_SIZE / 2 + (height / 2 - translation[1]) * scale)
    resized = Image.fromarray(face).resize((scaled_width, scaled_height), resample=Image.Resampling.BICUBIC)
    aligned = np.asarray(resized.crop((left, top, left + RECON_SIZE, top + RECON_SIZE)).convert("RGB"))
    params = np.array([width, height, scale, translation[0], translation[1]], dtype=np.float32)
    return aligned, params


def reconstruct_coefficients(
    network: FaceReconstructionNet,
    aligned: list[np.ndarray],
    params: list[np.ndarray],
    device: torch.device | str,
) -> np.ndarray:
    """``(n, 73)`` source descriptions: expression 64, angles 3, translation 3, alignment (s, tx, ty)."""
    import torch

    from sadtalker.networks.face_recon import split_face_coefficients

    rows = []
    for start in range(0, len(aligned), _RECON_BATCH):
        batch = np.stack(aligned[start : start + _RECON_BATCH]).astype(np.float32) / 255.0
        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            groups = split_face_coefficients(network(tensor).float().cpu())
        pose = torch.cat(
            [groups["expression"], groups["angle"], groups["translation_xy"], groups["translation_z"]], dim=1
        )
        alignment = torch.from_numpy(np.stack(params[start : start + _RECON_BATCH])[:, 2:])
        rows.append(torch.cat([pose, alignment], dim=1).numpy())
    return np.concatenate(rows).astype(np.float32)


def source_coefficients(
    network: FaceReconstructionNet, face: PreparedFace, device: torch.device | str
) -> np.ndarray:
    """The ``(73,)`` 3DMM description of a prepared photo."""
    aligned, params = align_for_reconstruction(face.image, face.landmarks)
    return reconstruct_coefficients(network, [aligned], [params], device)[0]


# --- reference videos -----------------------------------------------------------------------------


def read_video_frames(path: Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 frames of a video, decoded by the bundled ffmpeg, at the video's own frame rate."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise VideoFileError(f"Reference video {path} was not found. Check its path.")
    if path.stat().st_size == 0:
        raise VideoFileError(f"Reference video {path.name} is empty (0 bytes). Choose another video.")
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = reader.__next__()
    except (OSError, RuntimeError, StopIteration) as exc:
        if "does not contain any stream" in str(exc):
            raise VideoFileError(f"{path.name} has no video track. Choose a video showing a face.") from exc
        raise VideoFileError(
            f"{path.name} could not be read as a video (ffmpeg: {stderr_tail(str(exc), 200)}). "
            "Use an MP4, MOV, WebM or AVI file."
        ) from exc
    width, height = meta["size"]
    produced = 0
    try:
        for raw in reader:
            if max_frames is not None and produced >= max_frames:
                break
            yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
            produced += 1
    except (OSError, RuntimeError) as exc:
        raise VideoFileError(
            f"{path.name}: decoding failed after {produced} frames ({stderr_tail(str(exc), 200)})."
        ) from exc
    finally:
        reader.close()
    if produced == 0:
        raise VideoFileError(f"{path.name} has no video frames. Choose a video showing a face.")


def reference_video_coefficients(
    path: Path,
    mode: str,
    landmarker: FaceLandmarker,
    network: FaceReconstructionNet,
    device: torch.device | str,
    max_frames: int | None = None,
) -> np.ndarray:
    """``(frames, 73)`` per-frame 3DMM descriptions of a reference video (for blinks or head pose).

    As the reference does: the crop is placed from the first frame's face and applied to every frame;
    each frame's landmarks are found again (a frame without a face reuses the previous frame's).
    Only the first ``max_frames`` frames are read (the result is never used beyond the clip's
    length), and frames go through the reconstruction network in small batches as they are decoded.
    """
    path = Path(path)
    first: PreparedFace | None = None
    previous = np.zeros((68, 2), dtype=np.float32)
    aligned: list[np.ndarray] = []
    params: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for index, frame in enumerate(read_video_frames(path, max_frames)):
        found = landmarker.landmarks(frame)
        if first is None:
            first = prepare_face(
                frame,
                mode,
                REFERENCE_VIDEO_SIZE,
                landmarker,
                what=f"the first frame of the reference video {path.name}",
                landmarks=found,
            )
            crop_landmarks = first.landmarks
        else:
            crop_landmarks = previous if found is None else _landmarks_in(first, found)
        face = first.image if index == 0 else _crop_like(first, frame)
        image_aligned, image_params = align_for_reconstruction(face, crop_landmarks)
        aligned.append(image_aligned)
        params.append(image_params)
        previous = crop_landmarks
        if len(aligned) == _RECON_BATCH:
            rows.append(reconstruct_coefficients(network, aligned, params, device))
            aligned, params = [], []
    if aligned:
        rows.append(reconstruct_coefficients(network, aligned, params, device))
    return np.concatenate(rows)


def _landmarks_in(reference: PreparedFace, landmarks: np.ndarray) -> np.ndarray:
    if reference.geometry is None:
        return map_points_to_region(landmarks, reference.region, 1, reference.size)
    shown = reference.geometry.region(reference.mode.startswith("ext"))
    return map_points_to_region(landmarks, shown, reference.geometry.shrink, reference.size)


def _crop_like(reference: PreparedFace, frame: np.ndarray) -> np.ndarray:
    import cv2

    if reference.geometry is None:
        return cv2.resize(frame, (reference.size, reference.size))
    cut = _cut_region(frame, reference.geometry, reference.mode.startswith("ext"))
    return cv2.resize(cut, (reference.size, reference.size))


def even_size(width: float, height: float) -> tuple[int, int]:
    """The nearest even width and height (at least 2): H.264 in yuv420p needs even dimensions."""
    return max(2, 2 * round(width / 2)), max(2, 2 * round(height / 2))


def output_frame_size(face: PreparedFace) -> tuple[int, int]:
    """``(width, height)`` of the video frames.

    Crop modes and ``resize``: the render's width and the shown region's aspect ratio (as the
    reference resizes its frames), rounded to even numbers. Full modes: the photo's own size, less
    a last odd row or column.
    """
    if face.mode in ("full", "extfull"):
        width, height = face.photo_size
        return max(2, width - width % 2), max(2, height - height % 2)
    region_width, region_height = face.region_size
    return even_size(face.size, face.size * region_height / region_width)
