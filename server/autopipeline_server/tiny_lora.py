"""Tiny random LoRA adapters for a checkpoint's UNet, built offline with peft (for tests and demos)."""

from __future__ import annotations

import os
import pathlib

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

# The attention projections of every transformer block: where LoRA adapters usually live.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def build_tiny_lora(
    checkpoint: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    seed: int = 0,
    rank: int = 4,
    scale: float = 0.5,
) -> pathlib.Path:
    """Writes a LoRA for the UNet of `checkpoint` (a diffusers directory) to `out_file` (.safetensors).

    peft starts LoRA's B matrices at zero (no effect); here they are random (normal, times `scale`)
    so the adapter visibly changes the output. The same seed gives the same file.
    """
    out = pathlib.Path(out_file)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out} must end in .safetensors")
    unet = UNet2DConditionModel.from_pretrained(  # type: ignore[no-untyped-call]
        pathlib.Path(checkpoint) / "unet"
    )
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGET_MODULES)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    layers = convert_state_dict_to_diffusers(  # type: ignore[no-untyped-call]
        get_peft_model_state_dict(unet)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out.parent, unet_lora_layers=layers, weight_name=out.name, safe_serialization=True
    )
    return out
