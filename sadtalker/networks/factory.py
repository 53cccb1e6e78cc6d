"""Constructors for every network stored in the official SadTalker files, keyed by checkpoint prefix."""

from __future__ import annotations

from torch import nn

from sadtalker.networks.audio2exp import AudioToExpression
from sadtalker.networks.audio2pose import AudioToPose
from sadtalker.networks.face_recon import FaceReconstructionNet
from sadtalker.networks.generator import WarpingSpadeGenerator
from sadtalker.networks.keypoint_detector import CanonicalKeypointDetector
from sadtalker.networks.mapping import MappingNet

# Prefixes of the sub-models inside SadTalker_V0.0.2_{256,512}.safetensors, in file order.
SUB_MODEL_PREFIXES = ("kp_extractor", "generator", "audio2exp", "audio2pose", "face_3drecon")


def build_sub_model(prefix: str) -> nn.Module:
    """A freshly initialised (random-weight) network for one checkpoint prefix."""
    if prefix == "kp_extractor":
        return CanonicalKeypointDetector()
    if prefix == "generator":
        return WarpingSpadeGenerator()
    if prefix == "audio2exp":
        return AudioToExpression()
    if prefix == "audio2pose":
        return AudioToPose()
    if prefix == "face_3drecon":
        return FaceReconstructionNet()
    raise ValueError(f"unknown SadTalker sub-model prefix {prefix!r}; expected one of {SUB_MODEL_PREFIXES}")


def build_mapping(coeff_count: int) -> MappingNet:
    """The mapping network for 70 (crop/extcrop/resize) or 73 (full/extfull) coefficients."""
    return MappingNet(coeff_count=coeff_count)
