"""Turning an img2img/inpaint/outpaint request into the image, mask and size the sampler sees,
and the result back into a picture the size and framing the user expects (A1111's rules)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from contract.images import Img2ImgRequest
from pipelines.generation.image_ops import (
    composite_onto,
    crop_region,
    expand_to_aspect,
    extend_canvas,
    fill_masked_area,
    load_image,
    prepare_mask,
    resize_image,
    to_rgb,
)

LATENT_UPSCALE_RESIZE_MODE = 3
_FILL_NAMES = ("fill", "original", "latent noise", "latent nothing")


@dataclass
class SourcePlan:
    """One init image, prepared."""

    init: Image.Image  # what the sampler starts from, at ``size``
    size: tuple[int, int]  # processing size (multiple of 8)
    original: Image.Image  # the frame the result is composed into
    mask: Image.Image | None = None  # sampler mask at ``size`` (255 = change); None for plain img2img
    overlay_mask: Image.Image | None = None  # blurred mask at ``original``'s size, for the composite
    box: tuple[int, int, int, int] | None = None  # "only masked" crop region in ``original``
    notes: list[str] = field(default_factory=list)
    empty_mask: bool = False
    latent_upscale: bool = False  # resize mode 3: ``init`` keeps its own size; latents are scaled

    @property
    def is_inpaint(self) -> bool:
        return self.mask is not None

    def finish(self, generated: Image.Image) -> Image.Image:
        """Place the sampler's output back: paste the crop, then keep unmasked pixels exact."""
        generated = generated.convert("RGB")
        if not self.is_inpaint:
            return generated
        assert self.overlay_mask is not None
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            canvas = self.original.copy()
            canvas.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            generated = canvas
        return composite_onto(self.original, generated, self.overlay_mask)


def _round_up_to_8(value: int) -> int:
    return (value + 7) // 8 * 8


def plan_source(request: Img2ImgRequest, index: int, *, seed: int) -> SourcePlan:
    """Prepare init image ``index`` (cycled over the batch, as A1111 does)."""
    image = to_rgb(load_image(request.init_images[index % len(request.init_images)], field="init_images"))
    width, height = request.width, request.height
    notes: list[str] = []
    mask_image = load_image(request.mask, field="mask") if request.mask else None

    if request.outpainting:
        # Grow right/down so the canvas is a multiple of 8.
        grown_w = image.width + request.outpaint_left + request.outpaint_right
        grown_h = image.height + request.outpaint_up + request.outpaint_down
        extra_right = _round_up_to_8(grown_w) - grown_w
        extra_down = _round_up_to_8(grown_h) - grown_h
        canvas, new_area = extend_canvas(
            image,
            left=request.outpaint_left,
            right=request.outpaint_right + extra_right,
            up=request.outpaint_up,
            down=request.outpaint_down + extra_down,
        )
        if mask_image is not None:
            notes.append("outpainting ignores the uploaded mask: the new margins are the mask")
        prepared = prepare_mask(new_area, canvas.size, blur_x=request.mask_blur_x, blur_y=request.mask_blur_y)
        return SourcePlan(
            init=canvas,
            size=canvas.size,
            original=canvas,
            mask=prepared.mask,
            overlay_mask=prepared.mask,
            notes=notes,
        )

    if mask_image is None and request.resize_mode == LATENT_UPSCALE_RESIZE_MODE:
        # A1111's "Just resize (latent upscale)": encode the picture at its own size (to a multiple
        # of 8 for the VAE) and scale its latents to the target size.
        own_size = (max(8, image.width // 8 * 8), max(8, image.height // 8 * 8))
        init = image if image.size == own_size else image.resize(own_size, Image.Resampling.LANCZOS)
        return SourcePlan(init=init, size=(width, height), original=image, notes=notes, latent_upscale=True)

    if mask_image is None:
        return SourcePlan(
            init=resize_image(image, width, height, request.resize_mode),
            size=(width, height),
            original=image,
            notes=notes,
        )

    prepared = prepare_mask(
        mask_image,
        image.size,
        invert=bool(request.inpainting_mask_invert),
        blur_x=request.mask_blur_x,
        blur_y=request.mask_blur_y,
    )
    notes.extend(prepared.notes)
    if prepared.is_empty:
        notes.append("the mask is empty (all black): nothing to inpaint, the image is returned unchanged")
        return SourcePlan(
            init=image,
            size=image.size,
            original=image,
            mask=prepared.mask,
            overlay_mask=prepared.mask,
            notes=notes,
            empty_mask=True,
        )

    if request.inpaint_full_res:
        box = expand_to_aspect(
            crop_region(prepared.mask, request.inpaint_full_res_padding),
            width,
            height,
            image.width,
            image.height,
        )
        original = image
        init = resize_image(image.crop(box), width, height, 2)
        mask = resize_image(prepared.mask.crop(box), width, height, 2)
        overlay = prepared.mask
    else:
        box = None
        original = resize_image(image, width, height, request.resize_mode)
        init = original
        overlay = resize_image(prepared.mask, width, height, request.resize_mode)
        mask = overlay
    init = _apply_fill(init, mask, request.inpainting_fill, seed)
    return SourcePlan(
        init=init,
        size=(width, height),
        original=original,
        mask=mask,
        overlay_mask=overlay,
        box=box,
        notes=notes,
    )


def _apply_fill(init: Image.Image, mask: Image.Image, mode: int, seed: int) -> Image.Image:
    """A1111's "masked content". Latent noise/nothing are approximated in pixel space: diffusers'
    pipelines encode the init image themselves, so the masked area is replaced before encoding."""
    if mode == 0:
        return fill_masked_area(init, mask)
    if mode == 1:
        return init
    rng = np.random.default_rng(seed)
    if mode == 2:
        replacement = Image.fromarray(rng.integers(0, 256, (init.height, init.width, 3), dtype=np.uint8))
    else:
        replacement = Image.new("RGB", init.size, (127, 127, 127))
    return Image.composite(replacement, init, mask.point(lambda v: 255 if v >= 128 else 0))


def fill_name(mode: int) -> str:
    return _FILL_NAMES[mode]
