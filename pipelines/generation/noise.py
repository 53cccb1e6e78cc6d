"""Initial latent noise, reproducible across runs and machines.

Noise is always drawn on the CPU in float32 from ``torch.Generator('cpu').manual_seed(seed)``,
one generator per image, exactly as diffusers draws it when given ``generator=``. So a seed
gives the same picture on any GPU or on the CPU, and image *i* of a batch equals a single-image
run with seed ``seed + i`` (A1111's rule). Variation seeds blend two noises by spherical
interpolation, as A1111 does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (per sample)."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(
        1
    ) * high


def seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    import torch

    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)


def initial_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    subseeds: Sequence[int] | None = None,
    subseed_strength: float = 0.0,
) -> torch.Tensor:
    """A ``(len(seeds), *shape)`` float32 CPU tensor of starting noise."""
    import torch

    samples = []
    for index, seed in enumerate(seeds):
        noise = seeded_noise(seed, shape)
        if subseeds is not None and subseed_strength > 0:
            variation = seeded_noise(subseeds[index], shape)
            noise = slerp(subseed_strength, noise.flatten(1), variation.flatten(1)).view_as(noise)
        samples.append(noise)
    return torch.cat(samples, dim=0)


@contextmanager
def variation_noise(scheduler: Any, subseeds: Sequence[int], strength: float) -> Iterator[None]:
    """A1111's variation seeds for img2img and inpainting.

    diffusers draws the img2img noise inside the pipeline and hands it to ``scheduler.add_noise``;
    for the call, that method blends each image's noise with noise from its variation seed
    (spherical interpolation, as in :func:`initial_noise`). The same noise tensor always gets the
    same blend, so inpainting's per-step re-noising of the kept area stays consistent.
    """
    if strength <= 0:
        yield
        return
    original = scheduler.add_noise
    blended: list[tuple[Any, Any]] = []  # (diffusers' noise, our blend); tensors kept alive

    def blend(noise: torch.Tensor) -> torch.Tensor:
        for seen, result in blended:
            if seen is noise:
                return result
        import torch

        variation = torch.cat(
            [seeded_noise(subseeds[i % len(subseeds)], noise.shape[1:]) for i in range(noise.shape[0])]
        )
        mixed = slerp(strength, noise.detach().float().cpu().flatten(1), variation.flatten(1))
        result = mixed.view_as(variation).to(device=noise.device, dtype=noise.dtype)
        blended.append((noise, result))
        return result

    def add_noise(original_samples: Any, noise: Any, timesteps: Any) -> Any:
        return original(original_samples, blend(noise), timesteps)

    scheduler.add_noise = add_noise
    try:
        yield
    finally:
        del scheduler.add_noise
