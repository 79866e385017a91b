"""FLUX.1-dev (host class ``comfy.model_base.Flux``): one double and one single block at the release width.

The host fixes 24 heads and rope axes (16, 56, 56) for "flux" (``detect_unet_config``), so the head dim is 128 and
the width 3072: only the depth is free.  One double-stream and one single-stream block (about 0.55 B parameters,
1.1 GB in bf16) is the smallest the host accepts.  ``guidance_in`` makes it the guidance-distilled dev model
(``Flux``, not ``FluxSchnell``); context 4096 (T5-XXL) and pooled 768 (CLIP-L) are the release's.
"""
from __future__ import annotations

from .flow import Family, ModelFile
from .sd3 import VAE_16CH

MODEL = ModelFile(
    name="fewstep-standin-flux1-dev.safetensors",
    config=dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
                qkv_bias=True, in_channels=16, hidden_size=3072, context_in_dim=4096, patch_size=2, vec_in_dim=768,
                depth=1, depth_single_blocks=1, guidance_embed=True),
    mirrors="black-forest-labs/FLUX.1-dev flux1-dev.safetensors (BFL names, no prefix)")

FAMILY = Family(
    key="flux", host_class="Flux", model_sampling="ModelSamplingFlux",
    sampling_defaults={"shift": 1.15},
    sampling_node=("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 32, "height": 32}),
    models={"model": MODEL}, vae=VAE_16CH,
    latent=("EmptySD3LatentImage", {"width": 32, "height": 32, "batch_size": 1}), latent_shape=(1, 16, 4, 4),
    notes="CONST prediction; sigma = e^mu/(e^mu + 1/t - 1), timestep = sigma; guidance from FluxGuidance "
          "(3.5 when absent).")
