"""Coefficients -> video frames with the face renderer, streamed batch by batch.

Per clip (facts from OpenTalker/SadTalker ``src/facerender/modules/make_animation.py``): the keypoint
detector gives the source's canonical 3-D keypoints; the mapping network turns the source's own
coefficients (repeated over its 27-frame window) into the source keypoints. Per frame, the mapping
network turns the 27-frame window of driving coefficients around that frame into a head pose and
expression offsets, the keypoints are posed with them (user yaw/pitch/roll paths replace the predicted
angles), and the generator warps the source into the frame.

Unlike the reference, which rendered every frame before writing any, frames are produced for a range
``[start, end)`` in batches of ``batch_size`` and each batch is handed to a sink at once: memory does
not grow with the clip's length, and ranges can be rendered independently (each frame depends only on
the whole clip's coefficients, never on other frames) and joined. The source's feature volume is
computed once per clip instead of once per frame (same values: it depends on the source alone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sadtalker.coefficients import DrivingCoefficients, coefficient_windows
from sadtalker.errors import SadTalkerError

if TYPE_CHECKING:
    import torch

    from sadtalker.networks.keypoint_detector import CanonicalKeypointDetector
    from sadtalker.networks.mapping import MappingNet

log = logging.getLogger(__name__)

# Receives each rendered batch as ``(n, size, size, 3)`` RGB uint8 frames plus the first frame's index.
FrameSink = Callable[[np.ndarray, int], None]


class FaceGenerator(Protocol):
    """What the renderer needs from the generator (``WarpingSpadeGenerator`` provides it)."""

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor: ...

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class HeadAngles:
    """Optional per-frame user angles in degrees ``(T,)`` that replace the predicted ones."""

    yaw: np.ndarray | None = None
    pitch: np.ndarray | None = None
    roll: np.ndarray | None = None


def image_to_tensor(image: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """RGB uint8 ``(h, w, 3)`` -> ``(1, 3, h, w)`` float in [0, 1] on ``device``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255).to(device)


def frames_to_uint8(prediction: torch.Tensor) -> np.ndarray:
    """``(n, 3, h, w)`` in [0, 1] -> ``(n, h, w, 3)`` uint8 (rounded to the nearest level)."""
    import torch

    scaled = prediction.detach().float().clamp(0, 1).mul(255).round().to(dtype=torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class FrameRenderer:
    """Renders frames of one clip: per-clip work is done once, in ``__init__``."""

    def __init__(
        self,
        *,
        kp_extractor: CanonicalKeypointDetector,
        generator: FaceGenerator,
        mapping: MappingNet,
        source_image: np.ndarray,
        coefficients: DrivingCoefficients,
        device: torch.device | str,
        angles: HeadAngles | None = None,
    ) -> None:
        import torch

        from sadtalker.coefficients import SEMANTIC_RADIUS
        from sadtalker.networks.keypoints import pose_keypoints

        self._generator = generator
        self._mapping = mapping
        self._device = torch.device(device)
        self._coefficients = coefficients
        self._angles = angles or HeadAngles()
        for name in ("yaw", "pitch", "roll"):
            values = getattr(self._angles, name)
            if values is not None and len(values) != coefficients.frame_count:
                raise ValueError(
                    f"{name} path has {len(values)} values for {coefficients.frame_count} frames"
                )
        window = 2 * SEMANTIC_RADIUS + 1
        with torch.no_grad():
            image = image_to_tensor(source_image, self._device)
            self._canonical = kp_extractor(image)
            source_window = torch.from_numpy(np.repeat(coefficients.source[:, None], window, axis=1))
            source_motion = mapping(source_window[None].to(self._device))
            self._source_kp = pose_keypoints(self._canonical, source_motion)
            self._source_volume = generator.encode_source(image)

    @property
    def frame_count(self) -> int:
        return self._coefficients.frame_count

    def render(self, sink: FrameSink, start: int = 0, end: int | None = None, batch_size: int = 2) -> int:
        """Render frames ``start..end-1`` in batches, handing each batch to ``sink``; returns the count.

        A batch that runs the GPU out of memory is retried in halves (frames still reach ``sink`` in
        order); one frame that does not fit is a clear error.
        """
        from pipelines.generation.memory import free_accelerator_memory, is_out_of_memory

        end = self.frame_count if end is None else end
        if not 0 <= start <= end <= self.frame_count:
            raise ValueError(f"frame range [{start}, {end}) is outside the clip's {self.frame_count} frames")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        rendered = 0
        first = start
        while first < end:
            last = min(first + batch_size, end)
            try:
                prediction = self._render_batch(first, last)
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                out_of_memory = True
            else:
                out_of_memory = False
            if out_of_memory:  # outside the except block: its traceback holds the batch's tensors
                free_accelerator_memory()
                if batch_size == 1:
                    raise SadTalkerError(
                        "The GPU ran out of memory rendering a single frame. Use size 256 or "
                        "render_precision bf16, or free the GPU (unload the image model in Settings)."
                    )
                batch_size = max(1, batch_size // 2)
                log.warning("out of GPU memory rendering frames; retrying with batches of %d", batch_size)
                continue
            sink(frames_to_uint8(prediction), first)
            rendered += last - first
            first = last
        return rendered

    def _render_batch(self, first: int, last: int) -> torch.Tensor:
        import torch

        from sadtalker.networks.keypoints import pose_keypoints

        count = last - first
        windows = coefficient_windows(self._coefficients.frames, first, last)
        with torch.no_grad():
            motion = self._mapping(torch.from_numpy(windows).to(self._device))
            overrides = {
                f"{name}_degrees": torch.from_numpy(values[first:last]).to(self._device)
                for name in ("yaw", "pitch", "roll")
                if (values := getattr(self._angles, name)) is not None
            }
            driving_kp = pose_keypoints(self._canonical.expand(count, -1, -1), motion, **overrides)
            volume = self._source_volume.expand(count, *self._source_volume.shape[1:])
            source_kp = self._source_kp.expand(count, -1, -1)
            return self._generator.render(volume, driving_kp, source_kp)["prediction"]
