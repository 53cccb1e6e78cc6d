"""Occlusion-aware SPADE face generator (checkpoint prefix ``generator``).

The source portrait is encoded into a 3-D feature volume; a dense motion field, estimated from the
source and driving keypoints, warps that volume; an occlusion map dims what the warp cannot explain;
a SPADE decoder turns the warped features back into an image. Hyper-parameters default to the
official ``facerender.yaml`` (``generator_params`` with their ``dense_motion_params``). The same
weights work at 256 and 512 pixels: every layer is resolution-agnostic and the output has the
input's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sadtalker.networks.blocks import (
    SPADE_LEAKY_SLOPE,
    ConvNormAct2d,
    Downsample2dBlock,
    Hourglass3d,
    PreActResBlock3d,
    SpadeResidualBlock,
    coordinate_grid_3d,
    keypoint_gaussians,
)

# Variance of the keypoint blobs that tell the motion estimator where each keypoint moved.
KEYPOINT_VARIANCE = 0.01
# Motion-mask weights below this are dropped before blending the per-keypoint flows (as trained).
MASK_FLOOR = 1e-3


def warp_volume(source_volume: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
    """The source feature volume sampled along the dense motion (resized to the volume first)."""
    if deformation.shape[1:4] != source_volume.shape[2:]:
        deformation = F.interpolate(
            deformation.permute(0, 4, 1, 2, 3),
            size=source_volume.shape[2:],
            mode="trilinear",
            align_corners=False,
        ).permute(0, 2, 3, 4, 1)
    return F.grid_sample(
        source_volume, deformation, mode="bilinear", padding_mode="zeros", align_corners=False
    )


class DenseMotionEstimator(nn.Module):
    """Blends one candidate flow per keypoint (plus the identity) into a dense 3-D flow + occlusion map."""

    def __init__(
        self,
        num_kp: int = 15,
        feature_channels: int = 32,
        compressed_channels: int = 4,
        block_expansion: int = 32,
        num_blocks: int = 5,
        max_features: int = 1024,
        depth: int = 16,
    ) -> None:
        super().__init__()
        self.num_kp = num_kp
        self.hourglass = Hourglass3d(
            block_expansion, (num_kp + 1) * (compressed_channels + 1), num_blocks, max_features
        )
        self.mask = nn.Conv3d(self.hourglass.out_channels, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channels, compressed_channels, kernel_size=1)
        self.norm = nn.BatchNorm3d(compressed_channels)
        self.occlusion = nn.Conv2d(self.hourglass.out_channels * depth, 1, kernel_size=7, padding=3)

    def candidate_flows(
        self, shape: tuple[int, int, int, int], driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> torch.Tensor:
        """``(bs, K+1, d, h, w, 3)`` sampling grids: the identity, then one rigid shift per keypoint.

        Each shift maps a driving-frame position near keypoint k to the matching source position.
        """
        batch, depth, height, width = shape
        identity = coordinate_grid_3d(depth, height, width, device=source_kp.device, dtype=source_kp.dtype)
        identity = identity.view(1, 1, depth, height, width, 3)
        shift = (source_kp - driving_kp).view(batch, self.num_kp, 1, 1, 1, 3)
        per_keypoint = identity + shift
        return torch.cat([identity.expand(batch, 1, depth, height, width, 3), per_keypoint], dim=1)

    def forward(
        self, feature: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, _, depth, height, width = feature.shape
        feature = F.relu(self.norm(self.compress(feature)))
        flows = self.candidate_flows((batch, depth, height, width), driving_kp, source_kp)
        count = self.num_kp + 1

        # Warp the (compressed) source volume by every candidate flow.
        repeated = feature.unsqueeze(1).expand(batch, count, *feature.shape[1:])
        warped = F.grid_sample(
            repeated.reshape(batch * count, -1, depth, height, width),
            flows.reshape(batch * count, depth, height, width, 3),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        ).view(batch, count, -1, depth, height, width)

        # Where each keypoint is in the driving frame minus where it was in the source frame;
        # the background (identity) channel gets zeros.
        spatial = (depth, height, width)
        heat = keypoint_gaussians(driving_kp, spatial, KEYPOINT_VARIANCE) - keypoint_gaussians(
            source_kp, spatial, KEYPOINT_VARIANCE
        )
        heat = torch.cat([heat.new_zeros(batch, 1, depth, height, width), heat], dim=1).unsqueeze(2)

        hourglass_in = torch.cat([heat, warped], dim=2).view(batch, -1, depth, height, width)
        prediction = self.hourglass(hourglass_in)

        mask = F.softmax(self.mask(prediction), dim=1)
        weights = torch.where(mask < MASK_FLOOR, torch.zeros_like(mask), mask).unsqueeze(-1)
        deformation = (flows * weights).sum(dim=1)  # (bs, d, h, w, 3)

        occlusion = torch.sigmoid(self.occlusion(prediction.reshape(batch, -1, height, width)))
        return {"mask": mask, "deformation": deformation, "occlusion_map": occlusion}


class SpadeImageDecoder(nn.Module):
    """Warped 2-D features ``(bs, 256, h, w)`` -> RGB image ``(bs, 3, 4h, 4w)`` in [0, 1].

    The input is also the SPADE label map of every block, so the features steer their own decoding.
    """

    def __init__(self, in_channels: int = 256, out_channels: int = 64) -> None:
        super().__init__()
        wide = 2 * in_channels
        self.fc = nn.Conv2d(in_channels, wide, kernel_size=3, padding=1)
        for index in range(6):
            self.add_module(f"G_middle_{index}", SpadeResidualBlock(wide, wide, in_channels))
        self.up_0 = SpadeResidualBlock(wide, in_channels, in_channels)
        self.up_1 = SpadeResidualBlock(in_channels, out_channels, in_channels)
        self.conv_img = nn.Conv2d(out_channels, 3, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.fc(features)
        for index in range(6):
            out = getattr(self, f"G_middle_{index}")(out, features)
        out = self.up_0(F.interpolate(out, scale_factor=2.0, mode="nearest"), features)
        out = self.up_1(F.interpolate(out, scale_factor=2.0, mode="nearest"), features)
        return torch.sigmoid(self.conv_img(F.leaky_relu(out, SPADE_LEAKY_SLOPE)))


class WarpingSpadeGenerator(nn.Module):
    """Source image + source/driving keypoints -> rendered frame (the face renderer's generator)."""

    def __init__(
        self,
        num_kp: int = 15,
        image_channels: int = 3,
        feature_channels: int = 32,
        block_expansion: int = 64,
        max_features: int = 512,
        num_down_blocks: int = 2,
        depth: int = 16,
        num_resblocks: int = 6,
    ) -> None:
        super().__init__()
        self.dense_motion_network = DenseMotionEstimator(
            num_kp=num_kp, feature_channels=feature_channels, depth=depth
        )
        self.first = ConvNormAct2d(image_channels, block_expansion, kernel_size=3)
        widths = [min(max_features, block_expansion * (2**level)) for level in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(
            Downsample2dBlock(widths[level], widths[level + 1]) for level in range(num_down_blocks)
        )
        self.second = nn.Conv2d(widths[-1], max_features, kernel_size=1)
        self.feature_channels = feature_channels
        self.depth = depth
        self.resblocks_3d = nn.Sequential()
        for index in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{index}", PreActResBlock3d(feature_channels))
        decoder_channels = block_expansion * (2**num_down_blocks)
        self.third = ConvNormAct2d(max_features, decoder_channels, kernel_size=3, leaky=True)
        self.fourth = nn.Conv2d(decoder_channels, decoder_channels, kernel_size=1)
        self.decoder = SpadeImageDecoder(in_channels=decoder_channels)

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor:
        """The source image's 3-D feature volume ``(bs, 32, 16, H/4, W/4)``.

        It depends on the source image only, so a renderer can compute it once and reuse it for
        every frame (BatchNorm runs on running statistics in eval mode, so batching does not matter).
        """
        out = self.first(source_image)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        batch, _, height, width = out.shape
        return self.resblocks_3d(out.view(batch, self.feature_channels, self.depth, height, width))

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Warp an encoded source volume to the driving keypoints and decode it.

        Returns ``prediction`` (the frame, ``(bs, 3, H, W)`` in [0, 1]), ``mask`` (per-keypoint motion
        weights) and ``occlusion_map``.
        """
        motion = self.dense_motion_network(source_volume, driving_kp=driving_kp, source_kp=source_kp)
        warped = warp_volume(source_volume, motion["deformation"])
        batch, channels, depth, height, width = warped.shape
        out = self.fourth(self.third(warped.reshape(batch, channels * depth, height, width)))
        occlusion = motion["occlusion_map"]
        if occlusion.shape[2:] != out.shape[2:]:
            occlusion = F.interpolate(occlusion, size=out.shape[2:], mode="bilinear", align_corners=False)
        out = out * occlusion
        return {
            "prediction": self.decoder(out),
            "mask": motion["mask"],
            "occlusion_map": motion["occlusion_map"],
        }

    def forward(
        self, source_image: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.render(self.encode_source(source_image), driving_kp, source_kp)
