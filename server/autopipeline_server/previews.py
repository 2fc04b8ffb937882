"""Preview images of a call's latents between denoising steps (the VAE knowledge lives here)."""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch

PREVIEW_MAX_SIDE = 256


def decode_previews(pipe: Any, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Decodes latents with the pipeline's VAE into thumbnails of at most PREVIEW_MAX_SIDE pixels."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    # The SDXL VAE overflows in float16 (force_upcast); decode in float32 as the pipelines do, and
    # give the shared module back in its own dtype (only this thread touches it meanwhile).
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    dtype = vae.dtype
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype)
    images: list[PIL.Image.Image] = pipe.image_processor.postprocess(decoded.float(), output_type="pil")
    for image in images:
        image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    return images
