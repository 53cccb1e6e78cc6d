"""Speech -> per-frame 3DMM coefficients (64 expression + 3 rotation + 3 translation), as the reference.

Facts from OpenTalker/SadTalker (``src/generate_batch.py``, ``src/test_audio2coeff.py``,
``src/generate_facerender_batch.py``):

* the source face's 70 coefficients are repeated for every frame as the networks' reference;
* eye blinks: a per-frame "eye closure" ratio fed to the expression network. Random blinks of 5
  frames ``[0.5, 0.9, 1.0, 0.9, 0.5]``, each starting a random 10..min(T/2, 70)-1 frames after the
  previous one ended (none for clips of 20 frames or less); with a reference video, the ratio is all
  zeros and the video's own expressions replace the source's as the reference (so its blinks show);
* expression: ``audio2exp`` over chunks of 10 frames;
* pose: the ``audio2pose`` CVAE with one of 46 pose styles, then a Savitzky-Golay filter along time
  (window 13, order 2; the largest odd window for clips under 13 frames);
* a reference pose video adds its motion relative to its first frame to the predicted pose;
* for rendering, expressions are multiplied by ``expression_scale``; ``still`` keeps the source's
  pose (and crop parameters) in every frame; the full modes append the source's 3 crop parameters.

Randomness (blink timing and the CVAE latents) comes from the request's seed only, so a seed gives the
same coefficients on every run and device. The reference drew blinks from Python's global ``random``
and latents from torch's global generator; ours are a ``numpy`` generator and a CPU
``torch.Generator``, both seeded from the request's seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sadtalker.errors import SadTalkerError

if TYPE_CHECKING:
    import torch

    from sadtalker.checkpoints import SadTalkerModels

EXPRESSION_COUNT = 64
POSE_SLICE = slice(64, 70)
MOTION_COEFFICIENTS = 70
FULL_COEFFICIENTS = 73
POSE_STYLE_COUNT = 46
EXPRESSION_CHUNK_FRAMES = 10
BLINK_PROFILE = (0.5, 0.9, 1.0, 0.9, 0.5)
BLINK_MIN_FRAMES = 20
BLINK_FIRST_GAP = 10
BLINK_MAX_GAP = 70
POSE_SMOOTHING_WINDOW = 13
POSE_SMOOTHING_ORDER = 2
# Frames either side of each frame in the mapping network's coefficient window (27 frames in all).
SEMANTIC_RADIUS = 13


def blink_ratio(frame_count: int, rng: np.random.Generator) -> np.ndarray:
    """``(T, 1)`` float32 eye-closure ratios with random blinks (the reference's random blink sequence).

    Where the reference would pick from an empty range (a 21-frame clip) no blink is placed.
    """
    ratio = np.zeros((frame_count, 1), dtype=np.float32)
    if frame_count <= BLINK_MIN_FRAMES:
        return ratio
    low, high = min(BLINK_FIRST_GAP, frame_count), min(frame_count // 2, BLINK_MAX_GAP)
    if high <= low:
        return ratio
    length = len(BLINK_PROFILE)
    frame = 0
    while frame < frame_count:
        start = int(rng.integers(low, high))
        if frame + start + length > frame_count - 1:
            break
        ratio[frame + start : frame + start + length, 0] = BLINK_PROFILE
        frame += start + length
    return ratio


def tile_to_length(rows: np.ndarray, frame_count: int) -> np.ndarray:
    """``rows`` repeated (from the start) until there are ``frame_count``, then cut to that length."""
    if len(rows) == 0:
        raise SadTalkerError("The reference video gave no frames to follow.")
    repeats = -(-frame_count // len(rows))
    return np.concatenate([rows] * repeats)[:frame_count]


def smooth_pose(pose: np.ndarray) -> np.ndarray:
    """Savitzky-Golay smoothing along time of ``(T, 6)`` poses (window 13, order 2, as the reference).

    Clips shorter than 13 frames use the largest odd window that fits; under 3 frames no filter fits
    a quadratic, so the poses are returned as they are (the reference failed there).
    """
    from scipy.signal import savgol_filter

    frames = len(pose)
    window = POSE_SMOOTHING_WINDOW if frames >= POSE_SMOOTHING_WINDOW else (frames - 1) // 2 * 2 + 1
    if window <= POSE_SMOOTHING_ORDER:
        return pose.copy()
    return savgol_filter(pose, window, POSE_SMOOTHING_ORDER, axis=0).astype(np.float32)


def apply_reference_pose(coefficients: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Add a reference video's head motion (relative to its first frame) to the predicted poses."""
    frames = len(coefficients)
    reference_pose = tile_to_length(reference[:, POSE_SLICE], frames)
    moved = coefficients.copy()
    moved[:, POSE_SLICE] += reference_pose - reference_pose[:1]
    return moved


def validate_pose_style(pose_style: int) -> int:
    if not 0 <= pose_style < POSE_STYLE_COUNT:
        raise SadTalkerError(
            f"pose_style must be between 0 and {POSE_STYLE_COUNT - 1} (there are {POSE_STYLE_COUNT} "
            f"learned head-motion styles); got {pose_style}."
        )
    return pose_style


def predict_coefficients(
    models: SadTalkerModels,
    mel_windows: np.ndarray,
    source: np.ndarray,
    *,
    pose_style: int,
    seed: int,
    device: torch.device | str,
    ref_eyeblink: np.ndarray | None = None,
    ref_pose: np.ndarray | None = None,
) -> np.ndarray:
    """``(T, 70)`` predicted expression + pose per video frame.

    ``mel_windows`` ``(T, 80, 16)`` from :func:`sadtalker.audio.speech_to_mel_windows`; ``source``
    the photo's coefficients (70 or 73); ``ref_eyeblink``/``ref_pose`` per-frame coefficients of
    reference videos (``(N, >=70)``).
    """
    import torch

    validate_pose_style(pose_style)
    frames = len(mel_windows)
    rng = np.random.default_rng(seed)
    ratio = blink_ratio(frames, rng)
    reference = np.repeat(np.asarray(source[:MOTION_COEFFICIENTS], dtype=np.float32)[None], frames, axis=0)
    if ref_eyeblink is not None:
        ratio[:] = 0
        reference[:, :EXPRESSION_COUNT] = tile_to_length(ref_eyeblink[:, :EXPRESSION_COUNT], frames)

    mels = torch.from_numpy(np.ascontiguousarray(mel_windows, dtype=np.float32))[None, :, None].to(device)
    reference_t = torch.from_numpy(reference)[None].to(device)
    ratio_t = torch.from_numpy(ratio)[None].to(device)
    latents = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        expression = models.audio2exp.predict(
            mels, reference_t[:, :, :EXPRESSION_COUNT], ratio_t, chunk_frames=EXPRESSION_CHUNK_FRAMES
        )
        style = torch.tensor([pose_style], dtype=torch.long, device=device)
        pose = models.audio2pose.predict(mels, reference_t[:, 0, POSE_SLICE], style, generator=latents)
    coefficients = np.concatenate(
        [expression[0].float().cpu().numpy(), smooth_pose(pose[0].float().cpu().numpy())], axis=1
    ).astype(np.float32)
    if ref_pose is not None:
        coefficients = apply_reference_pose(coefficients, ref_pose)
    return coefficients


@dataclass(frozen=True)
class DrivingCoefficients:
    """What the renderer's mapping network consumes: the source row and one row per video frame."""

    source: np.ndarray  # (C,) with C = 70 (crop modes) or 73 (full modes)
    frames: np.ndarray  # (T, C)

    @property
    def frame_count(self) -> int:
        return len(self.frames)


def driving_coefficients(
    predicted: np.ndarray,
    source: np.ndarray,
    *,
    full_mode: bool,
    expression_scale: float = 1.0,
    still: bool = False,
) -> DrivingCoefficients:
    """Scale expressions, add the full modes' crop parameters and apply ``still`` (the reference's order)."""
    width = FULL_COEFFICIENTS if full_mode else MOTION_COEFFICIENTS
    source_row = np.asarray(source[:width], dtype=np.float32)
    if len(source_row) != width:
        raise ValueError(f"the source description needs {width} coefficients, got {len(source_row)}")
    frames = np.array(predicted[:, :MOTION_COEFFICIENTS], dtype=np.float32)
    frames[:, :EXPRESSION_COUNT] *= expression_scale
    if full_mode:
        crop_parameters = np.repeat(source_row[None, MOTION_COEFFICIENTS:], len(frames), axis=0)
        frames = np.concatenate([frames, crop_parameters], axis=1)
    if still:
        frames[:, EXPRESSION_COUNT:] = source_row[EXPRESSION_COUNT:]
    return DrivingCoefficients(source=source_row, frames=frames)


def coefficient_windows(frames: np.ndarray, start: int, end: int) -> np.ndarray:
    """``(end - start, C, 27)`` windows of frames ``start..end-1``, indices clamped to the clip."""
    offsets = np.arange(-SEMANTIC_RADIUS, SEMANTIC_RADIUS + 1)
    indices = np.clip(np.arange(start, end)[:, None] + offsets[None, :], 0, len(frames) - 1)
    return np.ascontiguousarray(frames[indices].transpose(0, 2, 1))


def camera_angles(degrees: Sequence[float], frame_count: int) -> np.ndarray:
    """Per-frame angles for a user head-pose path (the reference's ``gen_camera_pose``).

    One value holds it for the whole clip; several are visited in order at a constant angular speed
    (total travel spread over the clip), then the last value is held.
    """
    values = [float(value) for value in degrees]
    if not values:
        raise ValueError("an angle path needs at least one value")
    if len(values) == 1 or frame_count <= 1:
        return np.full(frame_count, values[0], dtype=np.float32)
    travel = sum(abs(b - a) for a, b in itertools.pairwise(values))
    path: list[float] = []
    if travel > 0:
        per_frame = travel / (frame_count - 1)
        for last, target in itertools.pairwise(values):
            if target != last:
                path.extend(np.arange(last, target, per_frame if target > last else -per_frame).tolist())
    path = path[:frame_count] or [values[0]]
    path.extend([path[-1]] * (frame_count - len(path)))
    return np.asarray(path, dtype=np.float32)
