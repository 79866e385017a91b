"""Qwen-Image (host class ``comfy.model_base.QwenImage``): one transformer block at the release width.

The host reads only the input channels and the block count (``detect_unet_config``); 24 heads of 128 (width
3072) and the 3584-wide text input (Qwen2.5-VL 7B hidden states) are the model class's fixed defaults.  One block
(0.38 B parameters) is the smallest it accepts.  Latents are the Wan 2.1 VAE's (16 channels), packed 2x2 to 64
input channels.
"""
from __future__ import annotations

from .flow import Family, ModelFile
from .wan import WAN21_VAE

MODEL = ModelFile(
    name="fewstep-standin-qwen_image_bf16.safetensors",
    config=dict(image_model="qwen_image", in_channels=64, num_layers=1),
    mirrors="Comfy-Org/Qwen-Image_ComfyUI qwen_image_bf16.safetensors (diffusers names, no prefix)")

FAMILY = Family(
    key="qwen_image", host_class="QwenImage", model_sampling="ModelSamplingFlux",
    sampling_defaults={"shift": 1.15},
    sampling_node=("ModelSamplingAuraFlow", {"shift": 3.1}),
    models={"model": MODEL}, vae=WAN21_VAE,
    latent=("EmptySD3LatentImage", {"width": 32, "height": 32, "batch_size": 1}), latent_shape=(1, 16, 4, 4),
    notes="The host loads it as ModelType.FLUX (ModelSamplingFlux, shift 1.15, timestep = sigma); "
          "ModelSamplingAuraFlow (what workflows use) swaps in ModelSamplingDiscreteFlow with multiplier 1, "
          "which also feeds the model timestep = sigma.")
