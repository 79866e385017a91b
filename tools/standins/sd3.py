"""SD3 (MMDiT, host class ``comfy.model_base.SD3``): the SD3-Medium layout at depth 2.

The host derives everything from the file: depth = hidden / 64 = number of joint blocks = number of heads
(``detect_unet_config``: ``x_embedder.proj.weight.shape[0] // 64``).  Depth 2 (hidden 128, 2 heads of 64) is the
smallest that keeps both block kinds of the release: a full joint block and the last, ``pre_only`` one whose
context stream has no attention output or MLP.  Context 4096 (T5-XXL width, CLIP-L/G padded to it) and pooled
2048 (CLIP-L + CLIP-G) are the release's; ``pos_embed`` covers 32 x 32 patches (512 px) instead of 192 x 192.
"""
from __future__ import annotations

import torch

from .flow import Family, ModelFile, VaeFile

DEPTH = 2

MODEL = ModelFile(
    name="fewstep-standin-sd3_medium.safetensors",
    config=dict(in_channels=16, patch_size=2, out_channels=16, depth=DEPTH, input_size=None, adm_in_channels=2048,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 64 * DEPTH}},
                num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None,
                x_block_self_attn_layers=[]),
    mirrors="stabilityai/stable-diffusion-3-medium sd3_medium.safetensors (model.diffusion_model.* keys)",
    dtype=torch.float16, prefix="model.diffusion_model.")

# The SD3 and Flux VAEs share one architecture (16-channel AutoencoderKL without quant convs, ch 128 x [1,2,4,4],
# which the host fixes); the 8x upsampling path is what tells it from the x4-upscaler VAE.
VAE_16CH = VaeFile(
    name="fewstep-standin-ae-16ch.safetensors",
    detect={"decoder.conv_in.weight": (512, 16, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3)},
    mirrors="black-forest-labs/FLUX.1-dev ae.safetensors / the SD3 VAE (encoder.*, decoder.* keys)")

FAMILY = Family(
    key="sd3", host_class="SD3", model_sampling="ModelSamplingDiscreteFlow",
    sampling_defaults={"shift": 3.0, "multiplier": 1000},
    sampling_node=("ModelSamplingSD3", {"shift": 3.0}),
    models={"model": MODEL}, vae=VAE_16CH,
    latent=("EmptySD3LatentImage", {"width": 32, "height": 32, "batch_size": 1}), latent_shape=(1, 16, 4, 4),
    notes="CONST prediction; sigma = shift*t/(1+(shift-1)*t), timestep = 1000*sigma.")
