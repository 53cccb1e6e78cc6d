"""Face restoration (GFPGAN, RestoreFormer) for the extras tab, txt2img's "Restore faces" and the
talking-head enhancer.

The pipeline follows what A1111 and facexlib do, in our own code:

1. find faces and five landmarks per face (eye centres, nose tip, mouth corners);
2. align each face onto the FFHQ 512x512 five-point template with a similarity transform
   (``cv2.estimateAffinePartial2D``);
3. run the restoration model on the 512x512 crop;
4. warp the result back with the inverse transform and paste it through a feathered mask
   (the warped crop square, eroded then blurred) so no seam shows;
5. blend the whole result with the original by ``visibility`` (A1111's ``gfpgan_visibility``).

Detection uses the Haar cascades that ship inside OpenCV (no download): the frontal-face cascade
finds boxes, the eye cascade finds the eyes inside each box's upper part, and the nose and mouth
corners come from the FFHQ template placed on those eyes. When the eyes are not found, they are
estimated from the face box. Haar only finds fairly frontal, upright faces; the result says which
detector ran and how each face was located.

Models are loaded with spandrel through :class:`pipelines.postprocess.upscalers.UpscalerCache`. spandrel 0.4.2
identifies GFPGAN (v1.2/1.3/1.4 "clean" architecture) and RestoreFormer; CodeFormer lives in the
separately licensed ``spandrel_extra_arches`` and RestoreFormer++ is not supported, so both are
refused with an explanation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from installer.launch_command import launch_command
from pipelines.errors import ModelNotFoundError, StudioError
from pipelines.postprocess.upscalers import UPSCALER_SUFFIXES, ImageModelLoadError, UpscalerCache

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image
    from spandrel import ImageModelDescriptor

FACE_SIZE = 512
# Five points (image-left eye, image-right eye, nose tip, left and right mouth corners) of a face
# aligned the way FFHQ (and so GFPGAN/RestoreFormer training data) is, in a 512x512 crop.
FFHQ_TEMPLATE_512: tuple[tuple[float, float], ...] = (
    (192.98138, 239.94708),
    (318.90277, 240.1936),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)
# Where the eyes sit inside an OpenCV frontal-face Haar box, as fractions of its width/height;
# used when the eye cascade finds no plausible pair.
HAAR_BOX_EYES: tuple[tuple[float, float], tuple[float, float]] = ((0.28, 0.37), (0.72, 0.37))
# Grey that fills the aligned crop outside the image (the FFHQ background average facexlib uses).
ALIGN_BORDER_RGB = (135, 133, 132)
DETECTOR_HAAR = "opencv-haar"
# Haar cost grows with the pixel count; faces stay findable on a copy this large.
DETECTION_MAX_SIDE = 1024
FACE_RESTORER_FOLDERS: tuple[str, ...] = ("GFPGAN", "RestoreFormer", "Codeformer")
RETINAFACE_WEIGHTS = "detection_Resnet50_Final.pth"


class FaceRestorerNotFoundError(ModelNotFoundError):
    """The face restorer name is unknown, or names an architecture SD Studio cannot run."""


class FaceRestorerWeightsMissingError(ModelNotFoundError):
    """The restorer is known but its weights file is not in the models folder."""


@dataclass(frozen=True)
class FaceRestorerSpec:
    """A face restorer users pick by name and the files that provide it."""

    name: str
    folders: tuple[str, ...]  # A1111 folders under models/ searched, in order
    stems: tuple[str, ...]  # accepted file names without extension, best first (case-insensitive)
    stem_prefix: str | None  # any other file whose name starts with this also provides it
    expected_file: str  # what to download, relative to models/
    source_url: str  # official release the download command fetches


FACE_RESTORERS: tuple[FaceRestorerSpec, ...] = (
    FaceRestorerSpec(
        name="GFPGAN",
        folders=("GFPGAN",),
        stems=("GFPGANv1.4", "GFPGANv1.3", "GFPGANCleanv1-NoCE-C2", "GFPGANv1.2"),
        stem_prefix="gfpgan",
        expected_file="GFPGAN/GFPGANv1.4.pth",
        source_url="https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/GFPGANv1.4.pth",
    ),
    FaceRestorerSpec(
        name="RestoreFormer",
        folders=("RestoreFormer", "GFPGAN"),
        stems=("RestoreFormer",),
        stem_prefix=None,
        # ``download --kind`` has no RestoreFormer folder; GFPGAN's release ships it, so it goes there.
        expected_file="GFPGAN/RestoreFormer.pth",
        source_url="https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/RestoreFormer.pth",
    ),
)

UNSUPPORTED_RESTORERS: dict[str, str] = {
    "codeformer": (
        "CodeFormer is not supported: spandrel 0.4.2 (the model loader SD Studio uses) only runs it "
        "through the separately licensed spandrel_extra_arches package. Use GFPGAN or RestoreFormer."
    ),
    "restoreformer++": (
        "RestoreFormer++ is not supported: spandrel 0.4.2 cannot load its architecture. "
        "Use RestoreFormer or GFPGAN."
    ),
}


@dataclass(frozen=True)
class DetectedFace:
    """One face: its box ``(x, y, width, height)`` and five landmarks in image pixels
    (image-left eye, image-right eye, nose tip, left and right mouth corners)."""

    box: tuple[int, int, int, int]
    landmarks: tuple[tuple[float, float], ...]
    eyes_detected: bool  # False: eyes estimated from the box


class FaceDetector(Protocol):
    """A face finder with five landmarks per face, e.g. RetinaFace from facexlib's weights (the app
    builds one when ``detection_Resnet50_Final.pth`` is installed); OpenCV Haar serves otherwise."""

    name: str

    def __call__(self, rgb: np.ndarray) -> list[DetectedFace]: ...


@dataclass
class FaceRestoreResult:
    """The restored image (same size and mode as the input) and what happened."""

    image: Image.Image
    faces_found: int
    detector: str
    messages: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES]
    # safetensors first, so a converted copy wins over the original .pth
    return sorted(files, key=lambda p: UPSCALER_SUFFIXES.index(p.suffix.lower()))


def _find_weights(models_root: Path, spec: FaceRestorerSpec) -> Path | None:
    candidates = [p for folder in spec.folders for p in _weight_files(Path(models_root) / folder)]
    for stem in spec.stems:
        for path in candidates:
            if path.stem.lower() == stem.lower():
                return path
    if spec.stem_prefix:
        for path in candidates:
            if path.stem.lower().startswith(spec.stem_prefix) and path.stem.lower() != "gfpganv1":
                return path  # "GFPGANv1" is the original, non-clean architecture spandrel lacks
    return None


_PLAIN_PATH = re.compile(r"[\w./\\:~-]+")


def _download_command(models_root: Path, spec: FaceRestorerSpec) -> str:
    command = launch_command("download", spec.source_url, "--kind", spec.expected_file.split("/")[0])
    command += " --allow-pickle"  # the official release is a .pth; SD Studio reads it weights-only
    root = str(models_root)
    if Path(models_root).name != "models":
        # Double quotes work in POSIX shells, PowerShell and cmd.exe alike.
        quoted = root if _PLAIN_PATH.fullmatch(root) else f'"{root}"'
        command += f" --models-dir {quoted}"
    return command


def _spec_by_name(name: str) -> FaceRestorerSpec | None:
    for spec in FACE_RESTORERS:
        if spec.name.lower() == name.strip().lower():
            return spec
    return None


def refuse_unsupported_restorer(model: str) -> None:
    """Raise for restorers SD Studio cannot run (CodeFormer, RestoreFormer++), naming why."""
    wanted = model.strip().lower()
    for key, reason in UNSUPPORTED_RESTORERS.items():
        if wanted == key or (key == "codeformer" and wanted.startswith("codeformer")):
            raise FaceRestorerNotFoundError(reason)


def resolve_face_restorer(models_root: Path, model: str) -> tuple[str, Path]:
    """``(restorer name, weights file)`` for what a user picked: a restorer name (``GFPGAN``,
    ``RestoreFormer``) or a file name/stem in the face restorer folders (``GFPGANv1.3``)."""
    wanted = model.strip()
    refuse_unsupported_restorer(wanted)
    spec = _spec_by_name(wanted)
    if spec is not None:
        path = _find_weights(models_root, spec)
        if path is None:
            expected = Path(models_root) / spec.expected_file
            raise FaceRestorerWeightsMissingError(
                f"Face restoration with {spec.name} needs {expected} (a .safetensors copy with the "
                f"same name also works), which is not there. Download it from the official release "
                f"({spec.source_url}) with: {_download_command(models_root, spec)}"
            )
        return spec.name, path
    for folder in FACE_RESTORER_FOLDERS:
        for path in _weight_files(Path(models_root) / folder):
            if wanted.lower() in (path.stem.lower(), path.name.lower()):
                return path.stem, path
    choices = ", ".join(spec.name for spec in FACE_RESTORERS)
    raise FaceRestorerNotFoundError(
        f"Unknown face restorer '{model}'. Choices: {choices}, or a weights file in "
        f"{Path(models_root) / 'GFPGAN'}."
    )


def list_face_restorers(models_root: Path) -> list[dict[str, Any]]:
    """Face restorers in the shape of A1111's ``GET /sdapi/v1/face-restorers``.

    GFPGAN is always listed (picking it without weights gives the download command, as A1111
    offers it before downloading); other restorers only when their weights are present.
    """
    restorers = []
    for spec in FACE_RESTORERS:
        path = _find_weights(models_root, spec)
        if path is None and spec.name != "GFPGAN":
            continue
        folder = path.parent if path is not None else Path(models_root) / spec.folders[0]
        restorers.append({"name": spec.name, "cmd_dir": str(folder)})
    return restorers


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------
def _cascade(filename: str) -> Any:
    import cv2

    path = Path(cv2.data.haarcascades) / filename
    classifier = cv2.CascadeClassifier(str(path))
    if classifier.empty():
        raise StudioError(
            f"OpenCV's face detector data {path} is missing or unreadable. Reinstall "
            "opencv-python-headless (pip install --force-reinstall opencv-python-headless)."
        )
    return classifier


def _eyes_on_template(
    left_eye: tuple[float, float], right_eye: tuple[float, float]
) -> tuple[tuple[float, float], ...]:
    """All five landmarks: the FFHQ template moved, turned and scaled so its eyes land on these."""
    t_left, t_right = complex(*FFHQ_TEMPLATE_512[0]), complex(*FFHQ_TEMPLATE_512[1])
    d_left, d_right = complex(*left_eye), complex(*right_eye)
    rotate_scale = (d_right - d_left) / (t_right - t_left)
    points = [d_left + (complex(*p) - t_left) * rotate_scale for p in FFHQ_TEMPLATE_512]
    return tuple((p.real, p.imag) for p in points)


def _pick_eyes(eyes: Any, box_w: int, box_h: int) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The most plausible (image-left, image-right) eye centres among eye-cascade hits inside a
    face box, in box coordinates; ``None`` when there is no believable pair."""
    centres = [(x + w / 2, y + h / 2) for (x, y, w, h) in eyes if y + h / 2 < 0.6 * box_h]
    expected = [(fx * box_w, fy * box_h) for fx, fy in HAAR_BOX_EYES]
    left = [c for c in centres if c[0] < box_w / 2]
    right = [c for c in centres if c[0] >= box_w / 2]
    if not left or not right:
        return None
    best_left = min(left, key=lambda c: math.dist(c, expected[0]))
    best_right = min(right, key=lambda c: math.dist(c, expected[1]))
    dx, dy = best_right[0] - best_left[0], best_right[1] - best_left[1]
    if not (0.25 * box_w <= dx <= 0.7 * box_w) or abs(dy) > 0.2 * box_w:
        return None
    return best_left, best_right


def _drop_nested(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Keep the largest of boxes whose centres fall inside another kept box."""
    kept: list[tuple[int, int, int, int]] = []
    for box in sorted(boxes, key=lambda b: b[2] * b[3], reverse=True):
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        if not any(k[0] <= cx <= k[0] + k[2] and k[1] <= cy <= k[1] + k[3] for k in kept):
            kept.append(box)
    return kept


def detect_faces_haar(rgb: np.ndarray) -> list[DetectedFace]:
    """Frontal faces in an ``(H, W, 3)`` uint8 RGB array, largest first, with 5 landmarks each."""
    import cv2

    height, width = rgb.shape[:2]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    factor = min(1.0, DETECTION_MAX_SIDE / max(height, width))
    if factor < 1.0:
        gray = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    min_side = max(24, min(gray.shape) // 24)
    found = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    eye_cascade = _cascade("haarcascade_eye.xml")
    faces = []
    for x, y, w, h in _drop_nested([tuple(int(v) for v in box) for box in found]):
        roi = gray[y : y + h, x : x + w]
        eye_min = max(6, w // 10)
        eyes = eye_cascade.detectMultiScale(roi, scaleFactor=1.1, minNeighbors=3, minSize=(eye_min, eye_min))
        pair = _pick_eyes(eyes, w, h)
        eyes_detected = pair is not None
        if pair is None:
            (lx, ly), (rx, ry) = ((fx * w, fy * h) for fx, fy in HAAR_BOX_EYES)
            pair = ((lx, ly), (rx, ry))
        left = ((x + pair[0][0]) / factor, (y + pair[0][1]) / factor)
        right = ((x + pair[1][0]) / factor, (y + pair[1][1]) / factor)
        box = (round(x / factor), round(y / factor), round(w / factor), round(h / factor))
        faces.append(DetectedFace(box, _eyes_on_template(left, right), eyes_detected=eyes_detected))
    return faces


# ---------------------------------------------------------------------------------------------
# alignment, restoration, paste-back
# ---------------------------------------------------------------------------------------------
def alignment_matrix(landmarks: tuple[tuple[float, float], ...]) -> np.ndarray | None:
    """2x3 similarity transform taking the face's landmarks onto the FFHQ 512 template
    (rotation, uniform scale and translation only, so the face is not distorted)."""
    import cv2
    import numpy as np

    source = np.asarray(landmarks, dtype=np.float32)
    target = np.asarray(FFHQ_TEMPLATE_512, dtype=np.float32) * (FACE_SIZE / 512)
    matrix, _ = cv2.estimateAffinePartial2D(source, target, method=cv2.LMEDS)
    return matrix


def _run_face_model(descriptor: ImageModelDescriptor, crop: np.ndarray) -> np.ndarray:
    """Restore one aligned ``(512, 512, 3)`` uint8 RGB crop; returns the same shape and dtype.

    GFPGAN's network works in [-1, 1] and spandrel's call wrapper does not convert, so it is
    called directly, with the noise buffers stored in the weights instead of fresh random noise
    (the same input then always gives the same face). RestoreFormer's wrapper converts itself.
    """
    import numpy as np
    import torch

    tensor = torch.from_numpy(crop.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    tensor = tensor.to(descriptor.device, descriptor.dtype)
    with torch.inference_mode():
        if descriptor.architecture.id == "GFPGAN":
            output = descriptor.model(tensor * 2 - 1, return_rgb=False, randomize_noise=False)[0]
            output = (output + 1) / 2
        else:
            output = descriptor(tensor)
    output = output[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (output * 255.0).round().astype(np.uint8)


def _paste_mask(inverse: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Where (and how strongly) a restored crop replaces the image: the crop square warped back,
    eroded by 1/20 of the face size and blurred, so the edge fades in over the face's border."""
    import cv2
    import numpy as np

    width, height = size
    square = np.ones((FACE_SIZE, FACE_SIZE), dtype=np.float32)
    mask = cv2.warpAffine(square, inverse, (width, height), flags=cv2.INTER_LINEAR)
    side = math.sqrt(float(mask.sum()))
    if side < 2:
        return mask
    erode = max(1, int(side / 20))
    mask = cv2.erode(mask, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8))
    blur = max(3, int(side / 10)) | 1
    return cv2.GaussianBlur(mask, (blur, blur), 0)


def _describe_detection(faces: list[DetectedFace], total: int, detector: FaceDetector | None = None) -> str:
    if detector is not None:
        return f"Face detector: {detector.name}; {total} face(s) found."
    located = sum(face.eyes_detected for face in faces)
    return (
        f"Face detector: OpenCV Haar cascades (frontal face + eyes); {total} face(s) found, eyes "
        f"located for {located}, estimated from the face box for {total - located}."
    )


def restore_faces(
    image: Image.Image,
    *,
    model: str,
    visibility: float = 1.0,
    codeformer_weight: float = 0.5,
    cache: UpscalerCache | None,
    models_root: Path,
    device: torch.device | str | None = None,
    detector: FaceDetector | None = None,
) -> FaceRestoreResult:
    """Restore every face found in ``image`` with ``model`` (``GFPGAN``, ``RestoreFormer`` or a
    weights file name), then blend with the original by ``visibility`` (0: unchanged, 1: fully
    restored).

    ``codeformer_weight`` (A1111's CodeFormer fidelity) only matters for CodeFormer, which
    spandrel 0.4.2 cannot load; it is validated and otherwise unused. No face found is not an
    error: the image comes back unchanged with a message, and callers decide what to tell users.
    ``detector`` replaces the OpenCV Haar detector (see :class:`FaceDetector`).
    """
    import cv2
    import numpy as np
    from PIL import Image

    if not 0.0 <= visibility <= 1.0:
        raise StudioError(f"Face restoration visibility must be between 0 and 1, got {visibility}.")
    if not 0.0 <= codeformer_weight <= 1.0:
        raise StudioError(f"CodeFormer weight must be between 0 and 1, got {codeformer_weight}.")
    rgb_image = image.convert("RGB")
    rgb = np.asarray(rgb_image)
    messages: list[str] = []
    if detector is None and (Path(models_root) / "GFPGAN" / RETINAFACE_WEIGHTS).is_file():
        messages.append(f"{RETINAFACE_WEIGHTS} found but not used here: faces are detected with OpenCV.")
    detect = detector or detect_faces_haar
    detector_name = detector.name if detector is not None else DETECTOR_HAAR

    if visibility == 0.0:
        refuse_unsupported_restorer(model)
        faces = detect(rgb)
        messages.append(_describe_detection(faces, len(faces), detector))
        messages.append("Visibility is 0: faces left as they were.")
        return FaceRestoreResult(image.copy(), len(faces), detector_name, messages)

    name, weights = resolve_face_restorer(models_root, model)
    faces = detect(rgb)
    if not faces:
        messages.append(f"No face found ({detector_name}): image returned unchanged.")
        return FaceRestoreResult(image.copy(), 0, detector_name, messages)
    messages.append(_describe_detection(faces, len(faces), detector))

    descriptor = (cache or UpscalerCache(1)).get(weights, device=device)
    if descriptor.purpose != "FaceSR":
        raise ImageModelLoadError(
            f"{weights.name} is a {descriptor.architecture.name} {descriptor.purpose} model, not a face "
            f"restoration model. Put upscalers in {Path(models_root) / 'ESRGAN'}."
        )
    height, width = rgb.shape[:2]
    restored = rgb.astype(np.float32)
    pasted = 0
    for face in faces:
        matrix = alignment_matrix(face.landmarks)
        if matrix is None:
            messages.append(f"Face at {face.box}: could not be aligned; left as is.")
            continue
        crop = cv2.warpAffine(
            rgb,
            matrix,
            (FACE_SIZE, FACE_SIZE),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=ALIGN_BORDER_RGB,
        )
        face_out = _run_face_model(descriptor, crop)
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(face_out, inverse, (width, height), flags=cv2.INTER_LINEAR)
        mask = _paste_mask(inverse, (width, height))[:, :, None]
        restored = mask * back.astype(np.float32) + (1.0 - mask) * restored
        pasted += 1
    messages.append(f"{name} ({weights.name}) restored {pasted} face(s).")

    blended = visibility * restored + (1.0 - visibility) * rgb.astype(np.float32)
    result = Image.fromarray(np.clip(blended.round(), 0, 255).astype(np.uint8), mode="RGB")
    if image.mode in ("RGBA", "LA"):
        result.putalpha(image.getchannel("A"))
    elif image.mode == "L":
        result = result.convert("L")
    return FaceRestoreResult(result, len(faces), detector_name, messages)
