"""Audio -> expression network (checkpoint prefix ``audio2exp``).

Predicts, per video frame, the 64 3DMM expression coefficients from that frame's mel window, the
source face's own expression coefficients and an eye-blink ratio.
"""

from __future__ import annotations

import torch
from torch import nn

from sadtalker.networks.audio_encoder import (
    AUDIO_EMBEDDING_SIZE,
    MEL_BANDS,
    MEL_WINDOW_STEPS,
    build_mel_conv_stack,
)

EXPRESSION_COEFFICIENTS = 64


class AudioToExpression(nn.Module):
    """Mel windows + the source's expression + a blink ratio -> 64 expression coefficients per frame.

    ``forward`` takes ``(bs*T, 1, 80, 16)`` mels, ``(bs, T, 64)`` reference expression and
    ``(bs, T, 1)`` blink ratio and returns ``(bs, T, 64)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = build_mel_conv_stack()
        self.mapping1 = nn.Linear(AUDIO_EMBEDDING_SIZE + EXPRESSION_COEFFICIENTS + 1, EXPRESSION_COEFFICIENTS)

    def forward(self, mels: torch.Tensor, reference: torch.Tensor, blink_ratio: torch.Tensor) -> torch.Tensor:
        count = mels.shape[0]
        audio = self.audio_encoder(mels).view(count, -1)
        features = torch.cat([audio, reference.reshape(count, -1), blink_ratio.reshape(count, -1)], dim=1)
        return self.mapping1(features).view(reference.shape[0], reference.shape[1], -1)

    def predict(
        self,
        mel_windows: torch.Tensor,
        reference: torch.Tensor,
        blink_ratio: torch.Tensor,
        chunk_frames: int = 10,
    ) -> torch.Tensor:
        """Expression coefficients ``(bs, T, 64)`` for a whole clip, ``chunk_frames`` frames at a time.

        ``mel_windows`` is ``(bs, T, 1, 80, 16)``, ``reference`` ``(bs, T, 64)`` (the source
        expression repeated per frame) and ``blink_ratio`` ``(bs, T, 1)``. Frames are independent
        in eval mode, so the chunk size only bounds memory (the official pipeline used 10).
        """
        frames = mel_windows.shape[1]
        outputs = []
        for start in range(0, frames, chunk_frames):
            stop = start + chunk_frames
            chunk = mel_windows[:, start:stop].reshape(-1, 1, MEL_BANDS, MEL_WINDOW_STEPS)
            outputs.append(self(chunk, reference[:, start:stop], blink_ratio[:, start:stop]))
        return torch.cat(outputs, dim=1)
