"""Live previews for ``/progress`` and the job event stream: latents to a small RGB picture.

Decoding with the VAE would cost as much as a sampling step and race the job for the device, so
the preview is the usual cheap linear projection of the 4 latent channels onto RGB (the same idea
as A1111's "Approx cheap" live preview), computed on the CPU from a copy.
"""

from __future__ import annotations

import base64
import io
from typing import Any

# Least-squares fits of latent channels to RGB published for SD 1.x/2.x and SDXL latents.
_SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
_SDXL_LATENT_RGB = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


def latent_preview_png(latents: Any, *, sdxl: bool = False) -> str | None:
    """Base64 PNG of the first image in a latent batch, or None if ``latents`` is not 4-channel."""
    import torch
    from PIL import Image

    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != 4:
        return None
    with torch.no_grad():
        sample = latents[0].detach().to("cpu", torch.float32)
        factors = torch.tensor(_SDXL_LATENT_RGB if sdxl else _SD_LATENT_RGB)
        rgb = torch.einsum("chw,cr->hwr", sample, factors)
        rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(rgb, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
