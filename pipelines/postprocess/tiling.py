"""Tiled inference helpers shared by the model upscalers and the SD x4 upscaler.

An image is cut into overlapping tiles (:func:`tile_starts`), each tile is run on its own, and
the tiles are cross-faded with feathered weights (:func:`axis_weights`) that ignore a margin near
each shared edge (where the model saw the tile border instead of the real neighbourhood), so
accelerator memory depends on the tile size, not on the image size. torch, numpy and PIL are
imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipelines.errors import UpscaleRequestError

if TYPE_CHECKING:
    import torch
    from PIL import Image

ProgressCallback = Callable[[int, int], None]
"""Called with (tiles done, tiles in this pass) after each tile; may raise to interrupt."""


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering ``[0, size)``, evenly spread, neighbours overlapping by at
    least ``overlap`` pixels (one tile when the image fits)."""
    if size <= tile:
        return [0]
    step = tile - overlap
    count = max(2, math.ceil((size - overlap) / step))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _feather(length: int, lead: bool, trail: bool, margin: float, ramp: float) -> torch.Tensor:
    """1-D weights of one tile: zero within ``margin`` of an edge shared with another tile
    (where the model saw the tile border instead of the real neighbourhood), then a linear ramp
    up to 1 over ``ramp`` pixels. Edges on the image border keep full weight."""
    import torch

    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length, dtype=torch.float32)
    if lead:
        weight = torch.minimum(weight, ((position - margin) / ramp).clamp(0.0, 1.0))
    if trail:
        weight = torch.minimum(weight, ((length - position - margin) / ramp).clamp(0.0, 1.0))
    return weight


def axis_weights(size: int, tile: int, starts: list[int], scale: int, overlap: int) -> list[torch.Tensor]:
    """Per-tile output weights along one axis, normalised so they sum to 1 at every pixel.

    Tiles form a grid, so 2-D weights are outer products of these and are normalised too.
    """
    import torch

    margin = (overlap // 4) * scale
    ramp = max(1, overlap - 2 * (overlap // 4)) * scale
    out_size = size * scale
    raw = []
    total = torch.zeros(out_size, dtype=torch.float32)
    for start in starts:
        length = min(tile, size - start) * scale
        weight = _feather(length, start > 0, start + tile < size, margin, ramp)
        total[start * scale : start * scale + length] += weight
        raw.append(weight)
    if bool((total <= 0).any()):  # cannot happen while overlap > 2 * margin; keep the guard honest
        raise UpscaleRequestError("Tile overlap too small for the feather; raise tile_overlap.")
    return [w / total[s * scale : s * scale + w.shape[0]] for s, w in zip(starts, raw, strict=True)]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB/L PIL image -> ``(1, C, H, W)`` float32 tensor in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """``(1, C, H, W)`` tensor in [0, 1] -> RGB (C=3) or L (C=1) PIL image."""
    import torch
    from PIL import Image

    array = (tensor[0].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    return Image.fromarray(array.transpose(1, 2, 0), mode="RGB")
