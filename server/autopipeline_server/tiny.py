"""Tiny random-weight diffusers checkpoints, built offline, for tests and the demo."""

from __future__ import annotations

import json
import os
import pathlib
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_dc import AutoencoderDC
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
from diffusers.models.autoencoders.vq_model import VQModel
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.prior_transformer import PriorTransformer
from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline
from diffusers.pipelines.deepfloyd_if.pipeline_if import IFPipeline
from diffusers.pipelines.deepfloyd_if.watermark import IFWatermarker
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.kandinsky.pipeline_kandinsky import KandinskyPipeline
from diffusers.pipelines.kandinsky.pipeline_kandinsky_prior import KandinskyPriorPipeline
from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import KandinskyV22Pipeline
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import KandinskyV22InpaintPipeline
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_prior import KandinskyV22PriorPipeline
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)
from diffusers.pipelines.pag.pipeline_pag_sd_xl import StableDiffusionXLPAGPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusers.pipelines.sana.pipeline_sana import SanaPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from diffusers.schedulers.scheduling_unclip import UnCLIPScheduler
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    XLMRobertaTokenizer,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

# Typing notes on diffusers: classes are imported from their defining modules because, for a type
# checker, the `diffusers` top level resolves to dummy placeholder objects. Model and scheduler
# constructors are wrapped by the untyped `@register_to_config` and return Any (hence the annotated
# locals). Pipeline constructors are annotated too strictly (the scheduler as the
# KarrasDiffusionSchedulers enum, optional components as required), so they get a components mapping.
#
# Shapes follow diffusers' own `get_dummy_components` (tests/pipelines/<family>/test_*.py), with
# these changes: tokenizers are built in memory (no hub), latent channel counts and VAE depths are
# the real checkpoints' (so vae_scale_factor, packing and patch sizes behave as in production), and
# every denoiser's sample size gives a 64x64 default image where the pipeline reads it from config.

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_MAX_LENGTH = 77
_CLIP_HIDDEN = 32
_LATENT_SIZE = 8  # UNet sample_size: times the VAE's factor 8 gives a 64x64 default image
_SDXL_TIME_EMBED_DIM = 8
_SDXL_TIME_IDS = 6  # original size, crop top-left and target size: (h, w) each
_T5_HIDDEN = 32
_QWEN_HIDDEN = 16
# The README entry through which a Kandinsky decoder names its prior (diffusers' CONNECTED_PIPES_KEYS).
_PRIOR = "prior"


# ------------------------------------------------------------------------------------------ tokenizers


def _vocab() -> dict[str, int]:
    """CLIP's layout: byte characters, their end-of-word forms, then the two special tokens."""
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [char + "</w>" for char in chars] + [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer(pad_token: str = _EOS) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=_vocab(), merges=[], pad_token=pad_token, model_max_length=_MAX_LENGTH)


def _unigram_pieces() -> list[tuple[str, float]]:
    """SentencePiece-style pieces: word-start marker, printable ASCII, and their word-initial forms."""
    chars = [char for char in string.printable if not char.isspace()]
    return [("▁", -1.0)] + [(char, -2.0) for char in chars] + [("▁" + char, -1.5) for char in chars]


def _t5_tokenizer(max_length: int) -> T5Tokenizer:
    # T5's ids: pad 0, eos 1, unk 2 (the encoder treats pad 0 as the decoder start token).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *_unigram_pieces()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _xlm_roberta_tokenizer() -> XLMRobertaTokenizer:
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *_unigram_pieces(), ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=_MAX_LENGTH)


def _gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's byte-fallback BPE with no merges: every character is spelled as its UTF-8 bytes."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    pieces = specials + [f"<0x{byte:02X}>" for byte in range(256)] + ["▁"]
    return GemmaTokenizer(vocab={piece: index for index, piece in enumerate(pieces)}, merges=[])


# The ChatML layout Qwen models are trained on; Flux.2-klein, Z-Image and Qwen-Image format prompts with it.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE with no merges, ChatML's special tokens and a minimal chat template."""
    pieces = [*sorted(ByteLevel.alphabet()), _EOS, *_QWEN_SPECIALS]
    tokenizer = Qwen2Tokenizer(
        vocab={piece: index for index, piece in enumerate(pieces)},
        merges=[],
        chat_template=_CHATML,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS)})
    return tokenizer


# ---------------------------------------------------------------------------------------- text encoders


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


def _t5_encoder(seed: int, tokenizer: T5Tokenizer, *, hidden: int = _T5_HIDDEN) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _qwen3_config(tokenizer: Qwen2Tokenizer, *, layers: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_QWEN_HIDDEN,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


# ---------------------------------------------------------------------------------------------- VAEs


def _vae(seed: int, *, latent_channels: int = 4, **extra: object) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae: AutoencoderKL = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),  # four blocks: vae_scale_factor 8
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=_LATENT_SIZE * 8,
        **extra,
    )
    return vae


def _flow_vae(seed: int, *, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The 16-channel VAE of the flow-matching families (SD3, Flux.1, Z-Image): no quant convs."""
    return _vae(
        seed,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _movq(seed: int) -> VQModel:
    """Kandinsky's MoVQ: four blocks (scale factor 8), spatially conditioned norms in the decoder."""
    torch.manual_seed(seed)
    movq: VQModel = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32, 32),  # SpatialNorm's GroupNorm has 32 groups
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    return movq


# ------------------------------------------------------------------------------------------ denoisers


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


def _sdxl_unet(seed: int) -> UNet2DConditionModel:
    # Cross-attention sees both encoders' hidden states concatenated; the "text_time" embedding takes
    # text_encoder_2's pooled projection plus the embedded micro-conditioning time ids.
    return _unet(
        seed,
        cross_attention_dim=2 * _CLIP_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_SDXL_TIME_IDS * _SDXL_TIME_EMBED_DIM + _CLIP_HIDDEN,
        use_linear_projection=True,
    )


def _kandinsky_unet(seed: int, *, in_channels: int, embed_type: str) -> UNet2DConditionModel:
    """Kandinsky's decoder UNet: conditioned on the prior's image embedding; predicts mean and variance."""
    torch.manual_seed(seed)
    unet: UNet2DConditionModel = UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=in_channels,
        out_channels=8,
        addition_embed_type=embed_type,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        encoder_hid_dim=_CLIP_HIDDEN,
        encoder_hid_dim_type=f"{embed_type}_proj",
        cross_attention_dim=_CLIP_HIDDEN,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    return unet


# ----------------------------------------------------------------------------------------- schedulers


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


def _kandinsky_scheduler() -> DDIMScheduler:
    scheduler: DDIMScheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    return scheduler


# ------------------------------------------------------------------------------------------- families


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


def _sdxl_components(seed: int) -> dict[str, Any]:
    return {
        "unet": _sdxl_unet(seed),
        "vae": _vae(seed + 1),
        "text_encoder": _text_encoder(seed + 2),
        "text_encoder_2": _text_encoder_with_projection(seed + 3),
        "tokenizer": _tokenizer(),
        "tokenizer_2": _tokenizer(pad_token="!"),  # as in the released SDXL checkpoint
        "scheduler": _sdxl_scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _build_sdxl(seed: int) -> DiffusionPipeline:
    return StableDiffusionXLPipeline(**_sdxl_components(seed))


def _build_sdxl_pag(seed: int) -> DiffusionPipeline:
    # Perturbed-attention guidance on the mid block's self-attention, the pipeline's default.
    return StableDiffusionXLPAGPipeline(**_sdxl_components(seed), pag_applied_layers="mid")


def _build_lcm(seed: int) -> DiffusionPipeline:
    # A latent-consistency UNet embeds the guidance scale (w) beside the timestep.
    components = _sd15_components(seed, unet_in_channels=4)
    components["unet"] = _unet(seed, time_cond_proj_dim=_CLIP_HIDDEN)
    scheduler: LCMScheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=True
    )
    components["scheduler"] = scheduler
    return LatentConsistencyModelPipeline(**components)


def _build_sd15_controlnet(seed: int) -> DiffusionPipeline:
    components = _sd15_components(seed, unet_in_channels=4)
    components.pop("requires_safety_checker")
    torch.manual_seed(seed + 3)
    # The conditioning embedding halves the control image three times: pixels down to latents (factor 8).
    controlnet: ControlNetModel = ControlNetModel(
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=_CLIP_HIDDEN,
        conditioning_embedding_out_channels=(4, 8, 8, 16),
    )
    # A ControlNet starts with zero convolutions (a trained one has long left them): random ones make
    # the control image change the output, so tests can tell whose control image a call used.
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in [*zero_convs, controlnet.controlnet_mid_block]:
            for parameter in conv.parameters():
                parameter.normal_(0.0, 0.3)
    return StableDiffusionControlNetPipeline(
        **components, controlnet=controlnet, requires_safety_checker=False
    )


def _kandinsky_prior_components(seed: int) -> dict[str, Any]:
    """The CLIP prior shared by Kandinsky 2.1 and 2.2: text embedding in, image embedding out."""
    torch.manual_seed(seed)
    prior: PriorTransformer = PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=_CLIP_HIDDEN, num_layers=1
    )
    # clip_std starts at 0, which would make every image embedding 0 (as in diffusers' tests).
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    image_size = 32
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=_CLIP_HIDDEN,
            projection_dim=_CLIP_HIDDEN,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=image_size,
            patch_size=16,
        )
    )
    scheduler: UnCLIPScheduler = UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    return {
        "prior": prior,
        "image_encoder": image_encoder,
        "text_encoder": _text_encoder_with_projection(seed + 2),
        "tokenizer": _tokenizer(),
        "scheduler": scheduler,
        "image_processor": CLIPImageProcessorPil(
            crop_size=image_size,
            size={"shortest_edge": image_size},
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        ),
    }


def _build_kandinsky21_prior(seed: int) -> DiffusionPipeline:
    return KandinskyPriorPipeline(**_kandinsky_prior_components(seed))


def _build_kandinsky22_prior(seed: int) -> DiffusionPipeline:
    return KandinskyV22PriorPipeline(**_kandinsky_prior_components(seed))


def _build_kandinsky21(seed: int) -> DiffusionPipeline:
    # Kandinsky 2.1's decoder also reads the prompt, through a multilingual CLIP (XLM-R) text encoder.
    tokenizer = _xlm_roberta_tokenizer()
    torch.manual_seed(seed + 2)
    # diffusers leaves MultilingualCLIP and its config unannotated.
    text_encoder = MultilingualCLIP(  # type: ignore[no-untyped-call]
        MCLIPConfig(  # type: ignore[no-untyped-call]
            imageDimSize=_CLIP_HIDDEN,
            transformerDimSize=_CLIP_HIDDEN,
            hidden_size=_CLIP_HIDDEN,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=_MAX_LENGTH + 2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    components: dict[str, Any] = {
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": _kandinsky_unet(seed, in_channels=4, embed_type="text_image"),
        "scheduler": _kandinsky_scheduler(),
        "movq": _movq(seed + 1),
    }
    return KandinskyPipeline(**components)


def _kandinsky22_components(seed: int, *, unet_in_channels: int) -> dict[str, Any]:
    return {
        "unet": _kandinsky_unet(seed, in_channels=unet_in_channels, embed_type="image"),
        "scheduler": _kandinsky_scheduler(),
        "movq": _movq(seed + 1),
    }


def _build_kandinsky22(seed: int) -> DiffusionPipeline:
    return KandinskyV22Pipeline(**_kandinsky22_components(seed, unet_in_channels=4))


def _build_kandinsky22_inpainting(seed: int) -> DiffusionPipeline:
    # 4 noisy latents + 4 masked-image latents + 1 mask.
    return KandinskyV22InpaintPipeline(**_kandinsky22_components(seed, unet_in_channels=9))


def _build_if(seed: int) -> DiffusionPipeline:
    """DeepFloyd IF stage I: a pixel-space UNet (64x64 RGB) conditioned on T5."""
    tokenizer = _t5_tokenizer(_MAX_LENGTH)
    torch.manual_seed(seed)
    unet: UNet2DConditionModel = UNet2DConditionModel(
        sample_size=64,
        in_channels=3,
        out_channels=6,  # mean and learned variance
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=_T5_HIDDEN,
        encoder_hid_dim=_T5_HIDDEN,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    scheduler: DDPMScheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    components: dict[str, Any] = {
        "tokenizer": tokenizer,
        "text_encoder": _t5_encoder(seed + 2, tokenizer),
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "watermarker": IFWatermarker(),  # type: ignore[no-untyped-call]  # unannotated in diffusers
        "requires_safety_checker": False,
    }
    return IFPipeline(**components)


def _build_sd3(seed: int) -> DiffusionPipeline:
    # Two CLIP encoders (hidden states concatenated, pooled outputs concatenated) and T5, whose width the
    # CLIP states are padded to; 16 latent channels, as the inpainting pipeline requires.
    t5_hidden = 2 * _CLIP_HIDDEN
    tokenizer_3 = _t5_tokenizer(256)
    torch.manual_seed(seed)
    transformer: SD3Transformer2DModel = SD3Transformer2DModel(
        sample_size=_LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=t5_hidden,
        pooled_projection_dim=2 * _CLIP_HIDDEN,
        pos_embed_max_size=16,
    )
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": _flow_vae(seed + 1, scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": _text_encoder_with_projection(seed + 2),
        "text_encoder_2": _text_encoder_with_projection(seed + 3),
        "text_encoder_3": _t5_encoder(seed + 4, tokenizer_3, hidden=t5_hidden),
        "tokenizer": _tokenizer(),
        "tokenizer_2": _tokenizer(pad_token="!"),
        "tokenizer_3": tokenizer_3,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }
    return StableDiffusion3Pipeline(**components)


def _build_flux(seed: int) -> DiffusionPipeline:
    # Flux.1-dev's layout: CLIP's pooled output and T5's states; 16 latent channels packed 2x2 (64 in);
    # the guidance scale is an embedding, not classifier-free guidance.
    tokenizer_2 = _t5_tokenizer(512)
    torch.manual_seed(seed)
    transformer: FluxTransformer2DModel = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_HIDDEN,
        pooled_projection_dim=_CLIP_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": _flow_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": _text_encoder(seed + 2),
        "text_encoder_2": _t5_encoder(seed + 3, tokenizer_2),
        "tokenizer": _tokenizer(),
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }
    return FluxPipeline(**components)


def _dynamic_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return scheduler


def _build_flux2_klein(seed: int) -> DiffusionPipeline:
    # The pipeline stacks text-encoder layers 9, 18 and 27 by default: 28 layers, three times the width.
    tokenizer = _qwen_tokenizer()
    latent_channels = 32
    torch.manual_seed(seed)
    transformer: Flux2Transformer2DModel = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latents are packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _QWEN_HIDDEN,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    torch.manual_seed(seed + 1)
    vae: AutoencoderKLFlux2 = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=_LATENT_SIZE * 8,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, layers=28))
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": _dynamic_flow_scheduler(),
        "is_distilled": True,  # as FLUX.2-klein-4B: step-distilled, no classifier-free guidance
    }
    return Flux2KleinPipeline(**components)


def _build_pixart_sigma(seed: int) -> DiffusionPipeline:
    # Resolution binning needs a sample size it has a table for; 32 latents is its smallest (256 px).
    tokenizer = _t5_tokenizer(300)
    torch.manual_seed(seed)
    transformer: PixArtTransformer2DModel = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=_T5_HIDDEN,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    scheduler: DPMSolverMultistepScheduler = DPMSolverMultistepScheduler()
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": _vae(seed + 1),
        "text_encoder": _t5_encoder(seed + 2, tokenizer),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
    return PixArtSigmaPipeline(**components)


def _build_sana(seed: int) -> DiffusionPipeline:
    # A six-stage deep-compression autoencoder (factor 32) and a Gemma 2 encoder. The decoder's input
    # shortcut repeats the latent channels up to its width, so the latents are no wider than its stages.
    tokenizer = _gemma_tokenizer()
    latent_channels = 8
    gemma_hidden = 8
    torch.manual_seed(seed)
    transformer: SanaTransformer2DModel = SanaTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=gemma_hidden,
        sample_size=16,  # the smallest with a resolution-binning table
    )
    torch.manual_seed(seed + 1)
    stages = 6
    vae: AutoencoderDC = AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(8,) * stages,
        decoder_block_out_channels=(8,) * stages,
        encoder_layers_per_block=(1,) * stages,
        decoder_layers_per_block=(1,) * stages,
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=gemma_hidden,
            intermediate_size=16,
            head_dim=4,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=8192,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    scheduler: DPMSolverMultistepScheduler = DPMSolverMultistepScheduler(
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
    return SanaPipeline(**components)


def _build_qwen_image(seed: int) -> DiffusionPipeline:
    # Qwen2.5-VL as the text encoder; a Wan-style causal VAE (16 channels, factor 8), latents packed 2x2.
    tokenizer = _qwen_tokenizer()
    z_dim = 16
    torch.manual_seed(seed)
    transformer: QwenImageTransformer2DModel = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_QWEN_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed + 1)
    vae: AutoencoderKLQwenImage = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": _QWEN_HIDDEN,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": _QWEN_HIDDEN,
            },
            vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"],
            image_token_id=vocab["<|image_pad|>"],
        )
    )
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": _dynamic_flow_scheduler(),
    }
    return QwenImagePipeline(**components)


def _build_z_image(seed: int) -> DiffusionPipeline:
    # Qwen3's second-to-last hidden states condition a single-stream DiT; 16 latent channels, 2x2 patches.
    tokenizer = _qwen_tokenizer()
    torch.manual_seed(seed)
    transformer: ZImageTransformer2DModel = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=_QWEN_HIDDEN,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64],
    )
    # The pad tokens come from torch.empty: give them seeded values so the same seed gives the same bytes.
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3Model(_qwen3_config(tokenizer, layers=2))
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": _flow_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
    return ZImagePipeline(**components)


@dataclass(frozen=True)
class _Family:
    """How to build one family: its pipeline and, for a Kandinsky decoder, the prior it is connected to."""

    build: Callable[[int], DiffusionPipeline]
    prior: Callable[[int], DiffusionPipeline] | None = None


_FAMILIES: Mapping[str, _Family] = {
    "sd15": _Family(_build_sd15),
    "sdxl": _Family(_build_sdxl),
    "sd15-inpainting": _Family(_build_sd15_inpainting),
    "kandinsky21": _Family(_build_kandinsky21, prior=_build_kandinsky21_prior),
    "kandinsky22": _Family(_build_kandinsky22, prior=_build_kandinsky22_prior),
    "kandinsky22-inpainting": _Family(_build_kandinsky22_inpainting, prior=_build_kandinsky22_prior),
    "if": _Family(_build_if),
    "sd3": _Family(_build_sd3),
    "flux": _Family(_build_flux),
    "flux2-klein": _Family(_build_flux2_klein),
    "pixart-sigma": _Family(_build_pixart_sigma),
    "sana": _Family(_build_sana),
    "qwen-image": _Family(_build_qwen_image),
    "z-image": _Family(_build_z_image),
    "lcm": _Family(_build_lcm),
    "sdxl-pag": _Family(_build_sdxl_pag),
    "sd15-controlnet": _Family(_build_sd15_controlnet),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _write_prior_card(path: pathlib.Path, family: str, prior: pathlib.Path) -> None:
    """The model card through which diffusers' combined Kandinsky pipelines find the decoder's prior.

    diffusers reads the card's `prior:` entry and calls `from_pretrained` on it, so it is an absolute path
    (a relative one would be resolved against the working directory): move the directory, rebuild it.
    """
    card = f"---\n{_PRIOR}:\n- {json.dumps(str(prior))}\n---\n\nTiny random-weight {family} checkpoint.\n"
    (path / "README.md").write_text(card, encoding="utf-8")


def build_tiny_checkpoint(family: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight ``family`` checkpoint into ``out_dir``; returns the directory written.

    The same seed gives byte-identical files (a Kandinsky decoder's README names its prior by absolute
    path, so it differs between directories). Weights are saved as safetensors beside a
    ``model_index.json``, so the result loads through the ordinary ``from_pretrained`` path; a
    Kandinsky decoder's prior is saved in ``prior/`` inside it and named in its README model card.
    """
    spec = _FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"unknown family {family!r}; expected one of: {', '.join(FAMILIES)}")
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    spec.build(seed).save_pretrained(path, safe_serialization=True)
    if spec.prior is not None:
        prior = path / _PRIOR
        # The prior draws from seeds apart from the decoder's.
        spec.prior(seed + 10).save_pretrained(prior, safe_serialization=True)
        _write_prior_card(path, family, prior.resolve())
    return path
