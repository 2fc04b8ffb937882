"""Preview images of a call's latents between denoising steps (the autoencoder knowledge lives here).

A preview is cheap where the latent space is known: a linear latent-to-RGB projection (the published
per-channel factors of the SD 1.x, SDXL, SD3 and Flux VAEs, as ComfyUI's `latent_formats.py` lists
them), picked by the VAE's own configuration (latent channels, scaling and shift factors), never by a
family name. Anything else is decoded in full: the VAE, Kandinsky's MoVQ, or nothing at all for
pixel-space models (DeepFloyd IF's latents are the image). Packed DiT latents are unpacked with the
pipeline's own `_unpack_latents` first (Flux, Qwen-Image), or with `_unpack_latents_with_ids` and the
position ids its own `_prepare_latent_ids` builds (Flux.2). Each full decode does what the pipeline
itself does after its loop: Flux.2 undoes its VAE's batch norm and unpatchifies; Qwen-Image's video
VAE takes per-channel `latents_mean`/`latents_std` and a frame dimension.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch

PREVIEW_MAX_SIDE = 256


@dataclass(frozen=True)
class LatentFormat:
    """A VAE's latent space as its config describes it, and the linear map of its latents to RGB."""

    name: str
    channels: int
    scaling_factor: float
    shift_factor: float | None
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def matches(self, config: Any) -> bool:
        shift = getattr(config, "shift_factor", None)
        return (
            int(getattr(config, "latent_channels", 0) or 0) == self.channels
            and abs(float(getattr(config, "scaling_factor", 0.0) or 0.0) - self.scaling_factor) < 1e-4
            and (shift is None) == (self.shift_factor is None)
            and (shift is None or self.shift_factor is None or abs(float(shift) - self.shift_factor) < 1e-4)
        )


# Published factors (ComfyUI comfy/latent_formats.py); they map model-space latents to RGB in [-1, 1].
LATENT_FORMATS: tuple[LatentFormat, ...] = (
    LatentFormat(
        "sd1",
        4,
        0.18215,
        None,
        (
            (0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177),
        ),
    ),
    LatentFormat(
        "sdxl",
        4,
        0.13025,
        None,
        (
            (0.3651, 0.4232, 0.4341),
            (-0.2533, -0.0042, 0.1068),
            (0.1076, 0.1111, -0.0362),
            (-0.3165, -0.2492, -0.2188),
        ),
        (0.1084, -0.0175, -0.0011),
    ),
    LatentFormat(
        "sd3",
        16,
        1.5305,
        0.0609,
        (
            (-0.0922, -0.0175, 0.0749),
            (0.0311, 0.0633, 0.0954),
            (0.1994, 0.0927, 0.0458),
            (0.0856, 0.0339, 0.0902),
            (0.0587, 0.0272, -0.0496),
            (-0.0006, 0.1104, 0.0309),
            (0.0978, 0.0306, 0.0427),
            (-0.0042, 0.1038, 0.1358),
            (-0.0194, 0.0020, 0.0669),
            (-0.0488, 0.0130, -0.0268),
            (0.0922, 0.0988, 0.0951),
            (-0.0278, 0.0524, -0.0542),
            (0.0332, 0.0456, 0.0895),
            (-0.0069, -0.0030, -0.0810),
            (-0.0596, -0.0465, -0.0293),
            (-0.1448, -0.1463, -0.1189),
        ),
        (0.2394, 0.2135, 0.1925),
    ),
    LatentFormat(
        "flux",
        16,
        0.3611,
        0.1159,
        (
            (-0.0346, 0.0244, 0.0681),
            (0.0034, 0.0210, 0.0687),
            (0.0275, -0.0668, -0.0433),
            (-0.0174, 0.0160, 0.0617),
            (0.0859, 0.0721, 0.0329),
            (0.0004, 0.0383, 0.0115),
            (0.0405, 0.0861, 0.0915),
            (-0.0236, -0.0185, -0.0259),
            (-0.0245, 0.0250, 0.1180),
            (0.1008, 0.0755, -0.0421),
            (-0.0515, 0.0201, 0.0011),
            (0.0428, -0.0012, -0.0036),
            (0.0817, 0.0765, 0.0749),
            (-0.1264, -0.0522, -0.1103),
            (-0.0280, -0.0881, -0.0499),
            (-0.1262, -0.0982, -0.0778),
        ),
        (-0.0329, -0.0718, -0.0851),
    ),
)


def _decoder_pipe(pipe: Any) -> Any:
    """The pipeline whose latents previews show: a combined pipeline's decoder, else the pipeline."""
    return getattr(pipe, "decoder_pipe", None) or pipe


def latent_hook(pipe: Any, named: Mapping[str, inspect.Parameter]) -> str | None:
    """The call argument through which the latents can be watched, or None.

    `callback_on_step_end` where the pipeline lists "latents" among its tensor inputs (combined
    Kandinsky 2.2 forwards it to the decoder); else the legacy `callback(step, timestep, latents)`
    (DeepFloyd IF, Kandinsky 2.1, PixArt).
    """
    decoder = _decoder_pipe(pipe)
    if "callback_on_step_end" in named and "latents" in getattr(decoder, "_callback_tensor_inputs", ()):
        return "callback_on_step_end"
    if "callback" in named:
        return "callback"
    return None


def _packs_with_ids(pipe: Any) -> bool:
    """Whether the pipeline scatters its tokens by position ids (Flux.2), which it builds from the shape."""
    return all(hasattr(pipe, name) for name in ("_unpack_latents_with_ids", "_prepare_latent_ids"))


def _unpacks(pipe: Any) -> bool:
    """Whether packed latents can be unpacked with the pipeline's own helpers."""
    return not hasattr(pipe, "_pack_latents") or hasattr(pipe, "_unpack_latents") or _packs_with_ids(pipe)


def _video_vae(vae: Any) -> bool:
    """A video-style VAE (Qwen-Image's): per-channel normalisation and (batch, channels, frames, h, w)."""
    config = vae.config
    return all(getattr(config, name, None) is not None for name in ("z_dim", "latents_mean", "latents_std"))


def can_preview(pipe: Any, named: Mapping[str, inspect.Parameter]) -> bool:
    decoder = _decoder_pipe(pipe)
    vae, movq = getattr(decoder, "vae", None), getattr(decoder, "movq", None)
    if latent_hook(pipe, named) is None or not _unpacks(decoder):
        return False
    if movq is not None:
        return True
    if vae is None:  # pixel-space: the latents are the image
        return getattr(decoder, "unet", None) is not None
    if hasattr(vae, "bn") and not hasattr(decoder, "_unpatchify_latents"):
        return False  # batch-normalised patch latents (Flux.2) need the pipeline's unpatchify
    # Other VAEs that normalise per channel (Playground's SDXL) decode by formulas not known here.
    known = latent_format(vae.config) is not None or _video_vae(vae)
    return known or getattr(vae.config, "latents_mean", None) is None


def latent_format(config: Any) -> LatentFormat | None:
    return next((f for f in LATENT_FORMATS if f.matches(config)), None)


class Previewer:
    """Turns one call's latents into thumbnails; `mode` "auto" projects linearly where it can."""

    def __init__(self, pipe: Any, width: int, height: int, *, mode: str = "auto") -> None:
        self._pipe = _decoder_pipe(pipe)
        self._width, self._height = width, height
        vae = getattr(self._pipe, "vae", None)
        self.format = latent_format(vae.config) if vae is not None and mode != "decode" else None
        self.mode = "linear" if self.format is not None else "decode"

    def __call__(self, latents: torch.Tensor) -> list[PIL.Image.Image]:
        with torch.no_grad():
            latents = self._unpacked(latents)
            rgb = self._linear(latents) if self.format is not None else self._decode(latents)
        return _thumbnails(rgb, (self._width, self._height))

    def _unpacked(self, latents: torch.Tensor) -> torch.Tensor:
        pipe = self._pipe
        if latents.ndim != 3 or not hasattr(pipe, "_pack_latents"):
            return latents
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        if hasattr(pipe, "_unpack_latents"):
            unpacked: torch.Tensor = pipe._unpack_latents(latents, self._height, self._width, scale)
            return unpacked
        # Flux.2: the ids its prepare_latents builds from the (batch, channels, h/2, w/2) patch grid.
        height, width = 2 * (self._height // (scale * 2)), 2 * (self._width // (scale * 2))
        grid = latents.new_empty(latents.shape[0], 1, height // 2, width // 2)
        ids = pipe._prepare_latent_ids(grid).to(latents.device)
        unpacked = pipe._unpack_latents_with_ids(latents, ids, height // 2, width // 2)
        return unpacked

    def _linear(self, latents: torch.Tensor) -> torch.Tensor:
        assert self.format is not None
        if latents.ndim == 5:  # (batch, channels, frames=1, h, w) of video-style VAEs
            latents = latents[:, :, 0]
        factors = torch.tensor(self.format.factors, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(self.format.bias, dtype=torch.float32, device=latents.device)
        rgb = torch.einsum("bchw,cr->brhw", latents.float(), factors) + bias[None, :, None, None]
        return (rgb + 1) / 2

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipe = self._pipe
        movq, vae = getattr(pipe, "movq", None), getattr(pipe, "vae", None)
        if movq is not None:
            decoded: torch.Tensor = movq.decode(latents.to(movq.dtype), force_not_quantize=True)["sample"]
        elif vae is None:
            decoded = latents[:, :3]  # pixel-space: the noisy image itself
        elif hasattr(vae, "bn"):
            decoded = _batch_norm_vae_decode(pipe, vae, latents)
        elif _video_vae(vae):
            decoded = _video_vae_decode(vae, latents)
        else:
            decoded = _vae_decode(vae, latents)
        return (decoded.float() + 1) / 2


def _batch_norm_vae_decode(pipe: Any, vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Flux.2's end of __call__: undo the VAE's batch norm on the patches, unpatchify, decode."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        latents.device, latents.dtype
    )
    latents = pipe._unpatchify_latents(latents * std + mean)
    decoded: torch.Tensor = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return decoded


def _video_vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's end of __call__: per-channel de-normalisation, decode, the one frame."""
    latents = latents.to(vae.dtype)
    if latents.ndim == 4:
        latents = latents[:, :, None]
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    decoded: torch.Tensor = vae.decode(latents / std + mean, return_dict=False)[0][:, :, 0]
    return decoded


def _vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
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
        decoded: torch.Tensor = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype)
    return decoded


def _thumbnails(rgb: torch.Tensor, size: Sequence[int]) -> list[PIL.Image.Image]:
    """Images in [0, 1] (batch, 3, h, w) as PIL thumbnails with the output's aspect ratio."""
    width, height = size
    scale = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    if tuple(rgb.shape[-2:]) != target:
        rgb = torch.nn.functional.interpolate(rgb, size=target, mode="bilinear", align_corners=False)
    pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(array) for array in pixels]
