"""Qwen-Image (host class ``comfy.model_base.QwenImage``): one transformer block at the release width.

The host reads only the input channels and the block count (``detect_unet_config``); 24 heads of 128 (width
3072) and the 3584-wide text input (Qwen2.5-VL 7B hidden states) are the model class's fixed defaults.  One block
(0.38 B parameters) is the smallest it accepts.  Latents are the Wan 2.1 VAE's (16 channels), packed 2x2 to 64
input channels.
"""
from __future__ import annotations

import functools

from .dit_loras import LoraFile, diffusers_linears, native_linears
from .flow import Family, ModelFile
from .wan import WAN21_VAE

MODEL = ModelFile(
    name="fewstep-standin-qwen_image_bf16.safetensors",
    config=dict(image_model="qwen_image", in_channels=64, num_layers=1),
    mirrors="Comfy-Org/Qwen-Image_ComfyUI qwen_image_bf16.safetensors (diffusers names, no prefix)")

# ---------------------------------------------------------------- LoRA files
#
# Qwen-Image-Lightning (lightx2v/Qwen-Image-Lightning Qwen-Image-Lightning-8steps-V1.0.safetensors): the model's
#   own (diffusers) module names with no prefix and kohya suffixes (transformer_blocks.N.attn.to_q.lora_down.weight
#   + .alpha), the layout diffusers' Qwen converter reads; rank 64 on the 12 attention and MLP linears of every block
#   (no modulation), which is the 0.85 GB of the 60-block bf16 release.  The alpha value (64 here) is not documented.
# Style: diffusers / PEFT names with the transformer. prefix (what diffusers' save_lora_weights writes), attention.
LORAS = (
    LoraFile("Qwen-Image-Lightning-8steps-V1.0_standin.safetensors", "acceleration", "lightning", "kohya", 64, 64.0,
             "model", "lightx2v/Qwen-Image-Lightning Qwen-Image-Lightning-8steps-V1.0.safetensors",
             reference="_convert_non_diffusers_qwen_lora_to_diffusers"),
    LoraFile("style-qwen-image-diffusers-peft_standin.safetensors", "style", "attn", "peft", 8, None, "model",
             "diffusers / PEFT Qwen-Image LoRA (transformer.transformer_blocks.N.attn.to_q.lora_A.weight)",
             reference="diffusers"),
)
_ATTN = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"


def lora_layout(lf: LoraFile, host: dict):
    if lf.layout == "lightning":
        return native_linears(host, _ATTN + r"|transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)"), {}, set()
    if lf.layout == "attn":
        return diffusers_linears(diffusers_model(lf.target), _ATTN), {}, set()
    raise ValueError(f"{lf.name}: unknown Qwen-Image LoRA layout {lf.layout!r}")


@functools.lru_cache(maxsize=None)
def diffusers_model(role: str):
    """diffusers' QwenImageTransformer2DModel at the stand-in's depth, on the meta device."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    with torch.device("meta"):
        return QwenImageTransformer2DModel(num_layers=MODEL.config["num_layers"])


FAMILY = Family(
    key="qwen_image", host_class="QwenImage", model_sampling="ModelSamplingFlux",
    sampling_defaults={"shift": 1.15},
    sampling_node=("ModelSamplingAuraFlow", {"shift": 3.1}),
    models={"model": MODEL}, vae=WAN21_VAE,
    latent=("EmptySD3LatentImage", {"width": 32, "height": 32, "batch_size": 1}), latent_shape=(1, 16, 4, 4),
    notes="The host loads it as ModelType.FLUX (ModelSamplingFlux, shift 1.15, timestep = sigma); "
          "ModelSamplingAuraFlow (what workflows use) swaps in ModelSamplingDiscreteFlow with multiplier 1, "
          "which also feeds the model timestep = sigma.",
    loras=LORAS, lora_layout=lora_layout, diffusers_model=diffusers_model)
