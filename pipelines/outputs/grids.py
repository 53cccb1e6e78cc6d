"""A1111's X/Y/Z plot as a library: vary request fields over listed values and lay the results
out in a labelled grid image (one grid per Z value, stacked)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipelines.errors import StudioError

PROMPT_SR = "prompt_sr"

# A1111's names for the axes (``scripts/xyz_grid.py``'s ``AxisOption`` labels), which its users read
# on the grid and in the infotext ("CFG Scale: 5", "X Type: CFG Scale"); fields A1111 has no axis for
# get their name in words ("mask_blur" -> "Mask blur").
AXIS_LABELS = {
    "seed": "Seed",
    "subseed": "Var. seed",
    "subseed_strength": "Var. strength",
    "steps": "Steps",
    "hr_second_pass_steps": "Hires steps",
    "cfg_scale": "CFG Scale",
    "image_cfg_scale": "Image CFG Scale",
    PROMPT_SR: "Prompt S/R",
    "sampler_name": "Sampler",
    "scheduler": "Schedule type",
    "eta": "Eta",
    "clip_skip": "Clip skip",
    "denoising_strength": "Denoising",
    "hr_upscaler": "Hires upscaler",
    "hr_scale": "Hires upscale",
    "styles": "Styles",
    "restore_faces": "Face restore",
    "token_merging_ratio": "Token merging ratio",
    "width": "Width",
    "height": "Height",
}
# Axes whose cells A1111 labels with the value alone ("Euler a", not "Sampler: Euler a").
VALUE_ONLY_AXES = frozenset({PROMPT_SR, "sampler_name", "restore_faces"})


def axis_label(field: str) -> str:
    """A1111's label for the axis over ``field``."""
    return AXIS_LABELS.get(field) or field.replace("_", " ").capitalize()


class GridAxisError(StudioError):
    """An axis names an unknown field or has no values."""


@dataclass(frozen=True)
class Axis:
    field: str
    values: tuple[str, ...]

    @property
    def label(self) -> str:
        """A1111's name for this axis ("CFG Scale"), as the grid and its infotext show it."""
        return axis_label(self.field)

    def cell_label(self, value: str) -> str:
        """One row/column heading: ``CFG Scale: 5``, or the value alone where A1111 writes that."""
        return value if self.field in VALUE_ONLY_AXES else f"{self.label}: {value}"

    @classmethod
    def parse(cls, text: str, allowed_fields: set[str], *, option: str) -> Axis:
        """``field=v1,v2,v3`` (A1111 also accepts ranges like ``10-30 (+10)``; so do we for ints).
        The field may also be written as A1111 names the axis (``CFG Scale=5,7``)."""
        name, sep, raw = text.partition("=")
        by_label = {label.lower(): field for field, label in AXIS_LABELS.items()}
        name = by_label.get(name.strip().lower(), name.strip().replace("-", "_"))
        if not sep or not raw.strip():
            raise GridAxisError(f"{option}: expected FIELD=VALUE1,VALUE2,... (got '{text}')")
        if name != PROMPT_SR and name not in allowed_fields:
            raise GridAxisError(f"{option}: '{name}' is not a request field (or {PROMPT_SR})")
        values = tuple(v.strip() for v in _expand_ranges(raw) if v.strip())
        if not values:
            raise GridAxisError(f"{option}: no values given for '{name}'")
        return cls(name, values)


def _expand_ranges(raw: str) -> list[str]:
    """``10-30 (+10)`` -> 10, 20, 30; anything else is a comma list (quotes keep commas)."""
    import csv

    items = next(csv.reader([raw], skipinitialspace=True))
    expanded: list[str] = []
    for item in items:
        text = item.strip()
        if "(+" in text and text.endswith(")") and "-" in text.split("(")[0]:
            span, _, step = text.partition("(+")
            start, _, stop = span.strip().partition("-")
            try:
                first, last, increment = int(start), int(stop), int(step.rstrip(")"))
            except ValueError:
                expanded.append(text)
                continue
            expanded.extend(str(v) for v in range(first, last + 1, max(1, increment)))
        else:
            expanded.append(text)
    return expanded


def cell_overrides(base: dict[str, Any], axes: list[Axis], combo: tuple[str, ...]) -> dict[str, Any]:
    """The request payload for one cell: base fields with this cell's axis values applied."""
    payload = dict(base)
    for axis, value in zip(axes, combo, strict=True):
        if axis.field == PROMPT_SR:
            search = axis.values[0]
            payload["prompt"] = str(payload.get("prompt", "")).replace(search, value)
            payload["negative_prompt"] = str(payload.get("negative_prompt", "")).replace(search, value)
        else:
            payload[axis.field] = value
    return payload


def combinations(axes: list[Axis]) -> list[tuple[str, ...]]:
    """Every cell, Z outermost then Y then X (so X varies fastest, as A1111 draws it)."""
    ordered = list(reversed(axes))
    return [tuple(reversed(combo)) for combo in itertools.product(*(a.values for a in ordered))]


def draw_grid(images: dict[tuple[str, ...], Image.Image], axes: list[Axis]) -> Image.Image:
    """Lay out cells with the X values on top, Y values on the left, one block per Z value."""
    x_axis = axes[0]
    y_axis = axes[1] if len(axes) > 1 else Axis("", ("",))
    z_axis = axes[2] if len(axes) > 2 else Axis("", ("",))
    sample = next(iter(images.values()))
    cell_w, cell_h = sample.size
    font = ImageFont.load_default(size=max(12, cell_h // 16))
    label_h = max(24, cell_h // 8)
    label_w = max(80, cell_w // 2) if len(axes) > 1 else 0
    block_h = label_h + cell_h * len(y_axis.values)
    title_h = label_h if len(axes) > 2 else 0
    width = label_w + cell_w * len(x_axis.values)
    height = (title_h + block_h) * len(z_axis.values)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for zi, z in enumerate(z_axis.values):
        top = zi * (title_h + block_h)
        if title_h:
            draw.text((4, top + 4), z_axis.cell_label(z), fill="black", font=font)
        for xi, x in enumerate(x_axis.values):
            draw.text(
                (label_w + xi * cell_w + 4, top + title_h + 4),
                x_axis.cell_label(x),
                fill="black",
                font=font,
            )
        for yi, y in enumerate(y_axis.values):
            row_top = top + title_h + label_h + yi * cell_h
            if label_w:
                draw.text((4, row_top + cell_h // 2), y_axis.cell_label(y), fill="black", font=font)
            for xi, x in enumerate(x_axis.values):
                key = tuple(v for v in (x, y, z)[: len(axes)])
                cell = images.get(key)
                if cell is not None:
                    grid.paste(cell.resize((cell_w, cell_h)), (label_w + xi * cell_w, row_top))
    return grid
