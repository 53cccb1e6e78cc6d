"""Mel-spectrogram encoder shared by the expression and pose networks (a Wav2Lip-style conv stack).

Each video frame comes with a ``(1, 80, 16)`` mel window (80 mel bands x 16 hops of 12.5 ms, i.e.
0.2 s of audio centred near the frame); the stack reduces it to one 512-dimensional embedding.
"""

from __future__ import annotations

import torch
from torch import nn

MEL_BANDS = 80
MEL_WINDOW_STEPS = 16
AUDIO_EMBEDDING_SIZE = 512


class MelConvBlock(nn.Module):
    """Conv2d -> BatchNorm (-> + input when ``residual``) -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return torch.relu(out)


def build_mel_conv_stack() -> nn.Sequential:
    """The 13-block stack: ``(N, 1, 80, 16)`` -> ``(N, 512, 1, 1)``.

    Strides shrink 80x16 to 27x16, 9x6, 3x3 and finally 1x1 (the unpadded 3x3 conv).
    """
    # (in, out, kernel, stride, padding, residual)
    layout: tuple[tuple[int, int, int, int | tuple[int, int], int, bool], ...] = (
        (1, 32, 3, 1, 1, False),
        (32, 32, 3, 1, 1, True),
        (32, 32, 3, 1, 1, True),
        (32, 64, 3, (3, 1), 1, False),
        (64, 64, 3, 1, 1, True),
        (64, 64, 3, 1, 1, True),
        (64, 128, 3, 3, 1, False),
        (128, 128, 3, 1, 1, True),
        (128, 128, 3, 1, 1, True),
        (128, 256, 3, (3, 2), 1, False),
        (256, 256, 3, 1, 1, True),
        (256, 512, 3, 1, 0, False),
        (512, 512, 1, 1, 0, False),
    )
    return nn.Sequential(*(MelConvBlock(*spec) for spec in layout))


class MelSequenceEncoder(nn.Module):
    """Per-frame mel windows ``(bs, T, 1, 80, 16)`` -> embeddings ``(bs, T, 512)``."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = build_mel_conv_stack()

    def forward(self, mel_windows: torch.Tensor) -> torch.Tensor:
        batch, frames = mel_windows.shape[:2]
        # Batch-major flattening. (The official encoder flattened time-major but unflattened
        # batch-major, which only agrees for batch size 1 - the only size it was ever run with.)
        flat = mel_windows.reshape(batch * frames, 1, MEL_BANDS, MEL_WINDOW_STEPS)
        return self.audio_encoder(flat).view(batch, frames, AUDIO_EMBEDDING_SIZE)
