"""RetinaFace for face restoration, when its weights are installed.

The talking-head library (``sadtalker``) has the RetinaFace network that loads facexlib's
``detection_Resnet50_Final.pth``; the image engine (``pipelines``) restores faces and accepts any
detector that gives five landmarks per face. The libraries don't know each other, so the app joins
them here: the engine calls :class:`RetinaFaceProvider` per job, and gets ``None`` (OpenCV Haar)
until the file is in ``models/GFPGAN`` (A1111's place for it) or ``models/SadTalker``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from pipelines.postprocess.face_restore import DetectedFace

log = logging.getLogger(__name__)

DETECTOR_FILE = "detection_Resnet50_Final.pth"
DETECTOR_FOLDERS = ("GFPGAN", "SadTalker")


class RetinaFaceRestoreDetector:
    """Adapts :class:`sadtalker.face_detection.RetinaFaceDetector` to face restoration's detector."""

    name = "RetinaFace (facexlib weights)"

    def __init__(self, detector: Any) -> None:
        self._detector = detector

    def __call__(self, rgb: np.ndarray) -> list[DetectedFace]:
        from pipelines.postprocess.face_restore import DetectedFace

        faces = []
        for face in self._detector.detect(rgb):
            x1, y1, x2, y2 = face.box
            faces.append(
                DetectedFace(
                    box=(int(x1), int(y1), max(1, int(x2 - x1)), max(1, int(y2 - y1))),
                    landmarks=tuple((float(x), float(y)) for x, y in face.five_points),
                    eyes_detected=True,
                )
            )
        return faces


class RetinaFaceProvider:
    """Loads the detector once per weights file (re-loads when the file changes); thread-safe."""

    def __init__(self, models_root: Path, device: str | None = None) -> None:
        self.models_root = Path(models_root)
        self.device = device
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[Path, float], RetinaFaceRestoreDetector] | None = None

    def weights(self) -> Path | None:
        for folder in DETECTOR_FOLDERS:
            path = self.models_root / folder / DETECTOR_FILE
            if path.is_file():
                return path
        return None

    def __call__(self) -> RetinaFaceRestoreDetector | None:
        path = self.weights()
        if path is None:
            return None
        key = (path, path.stat().st_mtime)
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                import torch

                from sadtalker.face_detection import load_retinaface

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                log.info("Face restoration detects faces with RetinaFace from %s", path)
                self._loaded = (key, RetinaFaceRestoreDetector(load_retinaface(path, device)))
            return self._loaded[1]
