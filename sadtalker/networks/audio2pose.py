"""Audio -> head pose network (checkpoint prefix ``audio2pose``): a conditional VAE over pose motion.

Given a pose style (one of 46 learned classes), the source head pose and the audio embeddings of 32
consecutive frames, the CVAE decoder turns a random latent into 32 frames of pose *motion*
(3 rotation + 3 translation coefficients relative to the first frame). Hyper-parameters default to
the official ``auido2pose.yaml``. The checkpoint also holds the CVAE encoder and a sequence
discriminator, which only training uses; they are built here so the file loads strictly.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from sadtalker.networks.audio_encoder import AUDIO_EMBEDDING_SIZE, MelSequenceEncoder

POSE_COEFFICIENTS = 6
POSE_STYLE_COUNT = 46


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: (BN-ReLU-Conv) x2 plus a Conv-BN projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        self.conv_skip = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class TimeUpsample(nn.Module):
    """Transposed conv doubling the time axis (height) and keeping the coefficient axis (width)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(channels, channels, kernel_size=(2, 1), stride=(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class SequenceResUnet(nn.Module):
    """Residual U-Net over a ``(bs, 1, T, 6)`` pose sequence, halving/doubling only the time axis."""

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.input_layer = nn.Sequential(
            nn.Conv2d(1, w0, kernel_size=3, padding=1),
            nn.BatchNorm2d(w0),
            nn.ReLU(),
            nn.Conv2d(w0, w0, kernel_size=3, padding=1),
        )
        self.input_skip = nn.Sequential(nn.Conv2d(1, w0, kernel_size=3, padding=1))
        self.residual_conv_1 = ResidualConvUnit(w0, w1, stride=(2, 1))
        self.residual_conv_2 = ResidualConvUnit(w1, w2, stride=(2, 1))
        self.bridge = ResidualConvUnit(w2, w3, stride=(2, 1))
        self.upsample_1 = TimeUpsample(w3)
        self.up_residual_conv1 = ResidualConvUnit(w3 + w2, w2, stride=1)
        self.upsample_2 = TimeUpsample(w2)
        self.up_residual_conv2 = ResidualConvUnit(w2 + w1, w1, stride=1)
        self.upsample_3 = TimeUpsample(w1)
        self.up_residual_conv3 = ResidualConvUnit(w1 + w0, w0, stride=1)
        self.output_layer = nn.Sequential(nn.Conv2d(w0, 1, kernel_size=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level0 = self.input_layer(x) + self.input_skip(x)
        level1 = self.residual_conv_1(level0)
        level2 = self.residual_conv_2(level1)
        bottom = self.bridge(level2)
        out = self.up_residual_conv1(torch.cat([self.upsample_1(bottom), level2], dim=1))
        out = self.up_residual_conv2(torch.cat([self.upsample_2(out), level1], dim=1))
        out = self.up_residual_conv3(torch.cat([self.upsample_3(out), level0], dim=1))
        return self.output_layer(out)


def _mlp(sizes: list[int], final_name: str, final_activation: nn.Module) -> nn.Sequential:
    """Linear layers named L0, L1, ... with ReLUs A0, A1, ... between them (the checkpoint's names)."""
    mlp = nn.Sequential()
    for index, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
        mlp.add_module(f"L{index}", nn.Linear(size_in, size_out))
        if index < len(sizes) - 2:
            mlp.add_module(f"A{index}", nn.ReLU())
    mlp.add_module(final_name, final_activation)
    return mlp


class PoseCvaeEncoder(nn.Module):
    """Training-only half of the CVAE: observed pose motion + conditions -> latent mean and log-variance."""

    def __init__(
        self,
        hidden_sizes: tuple[int, ...] = (192, 128),
        latent_size: int = 64,
        style_count: int = POSE_STYLE_COUNT,
        audio_out_size: int = POSE_COEFFICIENTS,
        seq_len: int = 32,
    ) -> None:
        super().__init__()
        self.resunet = SequenceResUnet()
        # The first width grows by everything concatenated to the pose embedding.
        first = hidden_sizes[0] + latent_size + seq_len * audio_out_size + POSE_COEFFICIENTS
        self.MLP = _mlp([first, *hidden_sizes[1:]], f"A{len(hidden_sizes) - 2}", nn.ReLU())
        self.linear_means = nn.Linear(hidden_sizes[-1], latent_size)
        self.linear_logvar = nn.Linear(hidden_sizes[-1], latent_size)
        self.linear_audio = nn.Linear(AUDIO_EMBEDDING_SIZE, audio_out_size)
        self.classbias = nn.Parameter(torch.randn(style_count, latent_size))

    def forward(
        self,
        pose_motion: torch.Tensor,
        style: torch.Tensor,
        reference_pose: torch.Tensor,
        audio: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pose_motion.shape[0]
        pose = self.resunet(pose_motion.unsqueeze(1)).reshape(batch, -1)
        audio_features = self.linear_audio(audio).reshape(batch, -1)
        hidden = self.MLP(torch.cat([reference_pose, pose, audio_features, self.classbias[style]], dim=-1))
        return self.linear_means(hidden), self.linear_logvar(hidden)


class PoseCvaeDecoder(nn.Module):
    """Latent + style + reference pose + 32 audio embeddings -> 32 frames of pose motion ``(bs, 32, 6)``."""

    def __init__(
        self,
        hidden_sizes: tuple[int, ...] = (128, 192),
        latent_size: int = 64,
        style_count: int = POSE_STYLE_COUNT,
        audio_out_size: int = POSE_COEFFICIENTS,
        seq_len: int = 32,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.resunet = SequenceResUnet()
        first = latent_size + seq_len * audio_out_size + POSE_COEFFICIENTS
        self.MLP = _mlp([first, *hidden_sizes], "sigmoid", nn.Sigmoid())
        self.pose_linear = nn.Linear(POSE_COEFFICIENTS, POSE_COEFFICIENTS)
        self.linear_audio = nn.Linear(AUDIO_EMBEDDING_SIZE, audio_out_size)
        self.classbias = nn.Parameter(torch.randn(style_count, latent_size))

    def forward(
        self, latent: torch.Tensor, style: torch.Tensor, reference_pose: torch.Tensor, audio: torch.Tensor
    ) -> torch.Tensor:
        batch = latent.shape[0]
        audio_features = self.linear_audio(audio).reshape(batch, -1)
        conditioned = latent + self.classbias[style]
        hidden = self.MLP(torch.cat([reference_pose, conditioned, audio_features], dim=-1))
        sequence = self.resunet(hidden.reshape(batch, 1, self.seq_len, -1))
        return self.pose_linear(sequence.squeeze(1))


class PoseCvae(nn.Module):
    def __init__(self, latent_size: int = 64, seq_len: int = 32) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.seq_len = seq_len
        self.encoder = PoseCvaeEncoder(latent_size=latent_size, seq_len=seq_len)
        self.decoder = PoseCvaeDecoder(latent_size=latent_size, seq_len=seq_len)


class _ConvNormRelu1d(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class PoseSequenceCritic(nn.Module):
    """Training-only discriminator over pose sequences ``(bs, T, 6)`` -> per-step scores."""

    def __init__(self, in_channels: int = POSE_COEFFICIENTS) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            _ConvNormRelu1d(in_channels, 256, kernel_size=4, stride=2, padding=1),
            _ConvNormRelu1d(256, 512, kernel_size=4, stride=2, padding=1),
            _ConvNormRelu1d(512, 1024, kernel_size=3, stride=1, padding=1),
            nn.Conv1d(1024, 1, kernel_size=3, stride=1, padding=1),
        )

    def forward(self, poses: torch.Tensor) -> torch.Tensor:
        sequence = poses.reshape(poses.shape[0], poses.shape[1], -1).transpose(1, 2)
        return self.seq(sequence).squeeze(1)


class AudioToPose(nn.Module):
    """Mel windows of a clip -> head pose coefficients per frame (see :meth:`predict`)."""

    def __init__(self, latent_size: int = 64, seq_len: int = 32) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.seq_len = seq_len
        self.audio_encoder = MelSequenceEncoder()
        self.netG = PoseCvae(latent_size=latent_size, seq_len=seq_len)
        self.netD_motion = PoseSequenceCritic()

    def predict(
        self,
        mel_windows: torch.Tensor,
        reference_pose: torch.Tensor,
        style: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pose coefficients ``(bs, T, 6)`` for mel windows ``(bs, T, 1, 80, 16)``.

        ``reference_pose`` ``(bs, 6)`` is the source face's rotation+translation; ``style`` ``(bs,)``
        holds pose-style ids in [0, 46). Frame 0 is the reference itself; frames 1.. are generated in
        windows of ``seq_len`` (32) with a fresh latent per window drawn from ``generator``. A final
        partial window re-runs the last 32 frames (padding at the front with the first embedding
        when the clip is shorter) and keeps only its tail, as the official pipeline does.
        """
        batch, frames = mel_windows.shape[:2]
        decoder = self.netG.decoder
        motions = [reference_pose.new_zeros(batch, 1, reference_pose.shape[-1])]
        remaining = mel_windows[:, 1:]
        generated = frames - 1
        full_windows, tail = divmod(generated, self.seq_len)

        def latent() -> torch.Tensor:
            device = generator.device if generator is not None else None
            noise = torch.randn(batch, self.latent_size, generator=generator, device=device)
            return noise.to(device=reference_pose.device, dtype=reference_pose.dtype)

        for window in range(full_windows):
            audio = self.audio_encoder(remaining[:, window * self.seq_len : (window + 1) * self.seq_len])
            motions.append(decoder(latent(), style, reference_pose, audio))
        if tail:
            audio = self.audio_encoder(remaining[:, -self.seq_len :])
            if audio.shape[1] < self.seq_len:
                padding = audio[:, :1].expand(batch, self.seq_len - audio.shape[1], audio.shape[2])
                audio = torch.cat([padding, audio], dim=1)
            motions.append(decoder(latent(), style, reference_pose, audio)[:, -tail:])
        return reference_pose.unsqueeze(1) + torch.cat(motions, dim=1)
