"""Tiny random-weight diffusers checkpoints, built offline, for tests and the demo."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Typing notes on diffusers: classes are imported from their defining modules because, for a type
# checker, the `diffusers` top level resolves to dummy placeholder objects. Model and scheduler
# constructors are wrapped by the untyped `@register_to_config` and return Any (hence the annotated
# locals). Pipeline constructors are annotated too strictly (the scheduler as the
# KarrasDiffusionSchedulers enum, optional components as required), so they get a components mapping.

FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd15-inpainting")

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_MAX_LENGTH = 77
_CLIP_HIDDEN = 32
_LATENT_SIZE = 8  # UNet sample_size: times the VAE's factor 8 gives a 64x64 default image
_SDXL_TIME_EMBED_DIM = 8
_SDXL_TIME_IDS = 6  # original size, crop top-left and target size: (h, w) each


def _vocab() -> dict[str, int]:
    """CLIP's layout: byte characters, their end-of-word forms, then the two special tokens."""
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [char + "</w>" for char in chars] + [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer(pad_token: str = _EOS) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=_vocab(), merges=[], pad_token=pad_token, model_max_length=_MAX_LENGTH)


def _text_config() -> CLIPTextConfig:
    vocab = _vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        projection_dim=_CLIP_HIDDEN,
        bos_token_id=vocab[_BOS],
        eos_token_id=vocab[_EOS],
        pad_token_id=vocab[_EOS],
    )


def _text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config())


def _text_encoder_with_projection(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config())


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae: AutoencoderKL = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),  # four blocks: vae_scale_factor 8
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=_LATENT_SIZE * 8,
    )
    return vae


def _unet(
    seed: int, *, in_channels: int = 4, cross_attention_dim: int = _CLIP_HIDDEN, **extra: object
) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet: UNet2DConditionModel = UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
        **extra,
    )
    return unet


def _sd15_scheduler() -> PNDMScheduler:
    """The scheduler config shipped with Stable Diffusion 1.5."""
    scheduler: PNDMScheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return scheduler


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """The scheduler config shipped with Stable Diffusion XL 1.0."""
    scheduler: EulerDiscreteScheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return scheduler


def _sd15_components(seed: int, *, unet_in_channels: int) -> dict[str, Any]:
    return {
        "unet": _unet(seed, in_channels=unet_in_channels),
        "vae": _vae(seed + 1),
        "text_encoder": _text_encoder(seed + 2),
        "tokenizer": _tokenizer(),
        "scheduler": _sd15_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _build_sd15(seed: int) -> DiffusionPipeline:
    return StableDiffusionPipeline(**_sd15_components(seed, unet_in_channels=4))


def _build_sd15_inpainting(seed: int) -> DiffusionPipeline:
    # The inpainting UNet takes 4 noisy latents + 1 mask + 4 masked-image latents.
    return StableDiffusionInpaintPipeline(**_sd15_components(seed, unet_in_channels=9))


def _build_sdxl(seed: int) -> DiffusionPipeline:
    # Cross-attention sees both encoders' hidden states concatenated; the "text_time" embedding takes
    # text_encoder_2's pooled projection plus the embedded micro-conditioning time ids.
    components: dict[str, Any] = {
        "unet": _unet(
            seed,
            cross_attention_dim=2 * _CLIP_HIDDEN,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=_SDXL_TIME_IDS * _SDXL_TIME_EMBED_DIM + _CLIP_HIDDEN,
            use_linear_projection=True,
        ),
        "vae": _vae(seed + 1),
        "text_encoder": _text_encoder(seed + 2),
        "text_encoder_2": _text_encoder_with_projection(seed + 3),
        "tokenizer": _tokenizer(),
        "tokenizer_2": _tokenizer(pad_token="!"),  # as in the released SDXL checkpoint
        "scheduler": _sdxl_scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }
    return StableDiffusionXLPipeline(**components)


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd15-inpainting": _build_sd15_inpainting,
}


def build_tiny_checkpoint(family: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight ``family`` checkpoint into ``out_dir``; returns the directory written.

    The same seed gives byte-identical files. Weights are saved as safetensors beside a
    ``model_index.json``, so the result loads through the ordinary ``from_pretrained`` path.
    """
    builder = _BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"unknown family {family!r}; expected one of: {', '.join(FAMILIES)}")
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    builder(seed).save_pretrained(path, safe_serialization=True)
    return path
