"""Turning canonical keypoints plus a :class:`HeadMotion` into posed keypoints for the generator.

The conventions below are those the official face renderer was trained with, including two quirks
kept on purpose because the weights expect them: degrees are converted with 3.14 rather than pi, and
only the vertical component of the predicted translation is applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sadtalker.networks.mapping import HeadMotion

# Pose bins: 66 bins of 3 degrees covering [-99, 99).
ANGLE_BIN_DEGREES = 3.0
ANGLE_OFFSET_DEGREES = -99.0
# The official code converts degrees to radians with this constant (not math.pi); the checkpoints
# were trained with it, so it is kept for fidelity (the difference is about 0.05%).
TRAINED_PI = 3.14


def bins_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """Expected angle in degrees ``(bs,)`` under the softmax of per-bin logits ``(bs, num_bins)``."""
    bins = torch.arange(logits.shape[1], device=logits.device, dtype=logits.dtype)
    return (F.softmax(logits, dim=1) * bins).sum(dim=1) * ANGLE_BIN_DEGREES + ANGLE_OFFSET_DEGREES


def rotation_matrices(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """``(bs, 3, 3)`` rotations ``R = Rx(pitch) @ Ry(yaw) @ Rz(roll)`` from angles in degrees ``(bs,)``."""
    yaw, pitch, roll = (angle / 180 * TRAINED_PI for angle in (yaw, pitch, roll))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def matrix(*rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    about_x = matrix(
        (one, zero, zero),
        (zero, torch.cos(pitch), -torch.sin(pitch)),
        (zero, torch.sin(pitch), torch.cos(pitch)),
    )
    about_y = matrix(
        (torch.cos(yaw), zero, torch.sin(yaw)),
        (zero, one, zero),
        (-torch.sin(yaw), zero, torch.cos(yaw)),
    )
    about_z = matrix(
        (torch.cos(roll), -torch.sin(roll), zero),
        (torch.sin(roll), torch.cos(roll), zero),
        (zero, zero, one),
    )
    return about_x @ about_y @ about_z


def pose_keypoints(
    canonical_kp: torch.Tensor,
    motion: HeadMotion,
    *,
    yaw_degrees: torch.Tensor | None = None,
    pitch_degrees: torch.Tensor | None = None,
    roll_degrees: torch.Tensor | None = None,
    with_expression: bool = True,
) -> torch.Tensor:
    """Rotate, translate and deform canonical keypoints ``(bs, K, 3)`` with a mapping output.

    ``*_degrees`` override the predicted angles (the official pipeline uses this for user-chosen
    head-pose sequences); ``with_expression=False`` drops the expression offsets.
    """
    yaw = bins_to_degrees(motion.yaw) if yaw_degrees is None else yaw_degrees
    pitch = bins_to_degrees(motion.pitch) if pitch_degrees is None else pitch_degrees
    roll = bins_to_degrees(motion.roll) if roll_degrees is None else roll_degrees
    rotation = rotation_matrices(yaw, pitch, roll)
    rotated = canonical_kp @ rotation.transpose(1, 2)
    # As trained: the x and z translations are discarded, only y moves the keypoints.
    translation = motion.t * motion.t.new_tensor([0.0, 1.0, 0.0])
    posed = rotated + translation.unsqueeze(1)
    if with_expression:
        posed = posed + motion.exp.view(motion.exp.shape[0], -1, 3)
    return posed
