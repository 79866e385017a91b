"""SD3 (MMDiT, host class ``comfy.model_base.SD3``): the SD3-Medium layout at depth 2.

The host derives everything from the file: depth = hidden / 64 = number of joint blocks = number of heads
(``detect_unet_config``: ``x_embedder.proj.weight.shape[0] // 64``).  Depth 2 (hidden 128, 2 heads of 64) is the
smallest that keeps both block kinds of the release: a full joint block and the last, ``pre_only`` one whose
context stream has no attention output or MLP.  Context 4096 (T5-XXL width, CLIP-L/G padded to it) and pooled
2048 (CLIP-L + CLIP-G) are the release's; ``pos_embed`` covers 32 x 32 patches (512 px) instead of 192 x 192.
"""
from __future__ import annotations

import functools

import torch

from .dit_loras import LoraFile, diffusers_linears, native_linears
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

# ---------------------------------------------------------------- LoRA files
#
# Hyper-SD3 (ByteDance/Hyper-SD Hyper-SD3-4steps-CFG-lora.safetensors) and PCM-SD3 (wangfuyun/PCM_Weights
#   sd3/pcm_deterministic_4step_shift3.safetensors) load with diffusers' load_lora_weights, so both are written in
#   diffusers / PEFT names (transformer.transformer_blocks.N.attn.to_q.lora_A.weight).  Coverage and rank are not
#   listed publicly: Hyper-SD3 here covers every block linear at rank 64 (as ByteDance's whole-UNet Hyper-SD LoRAs
#   and Hyper-FLUX do), PCM-SD3 the image-stream attention projections (to_q/k/v/out, the diffusers SD3 LoRA script's
#   first default) at rank 64.
# kohya sd-scripts SD3 style (networks/lora_sd3.py): MMDiT names, lora_unet_joint_blocks_N_x_block_attn_qkv + alpha.
LORAS = (
    LoraFile("Hyper-SD3-4steps-CFG-lora_standin.safetensors", "acceleration", "all-blocks", "peft", 64, None, "model",
             "ByteDance/Hyper-SD Hyper-SD3-4steps-CFG-lora.safetensors", reference="diffusers", dtype=torch.float16),
    LoraFile("pcm_deterministic_4step_shift3_standin.safetensors", "acceleration", "x-attn", "peft", 64, None, "model",
             "wangfuyun/PCM_Weights sd3/pcm_deterministic_4step_shift3.safetensors", reference="diffusers",
             dtype=torch.float16),
    LoraFile("style-sd3-kohya_standin.safetensors", "style", "kohya", "kohya", 8, 4.0, "model",
             "kohya-ss/sd-scripts networks/lora_sd3.py (lora_unet_joint_blocks_N_...)", dtype=torch.float16),
)


def lora_layout(lf: LoraFile, host: dict):
    if lf.layout == "all-blocks":
        return diffusers_linears(diffusers_model(lf.target), r"transformer_blocks\.\d+\..*"), {}, set()
    if lf.layout == "x-attn":
        include = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
        return diffusers_linears(diffusers_model(lf.target), include), {}, set()
    if lf.layout == "kohya":
        include = r"joint_blocks\.\d+\.(context_block|x_block)\.(attn\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)"
        return native_linears(host, include, "lora_unet_", underscore=True), {}, set()
    raise ValueError(f"{lf.name}: unknown SD3 LoRA layout {lf.layout!r}")


@functools.lru_cache(maxsize=None)
def diffusers_model(role: str):
    """diffusers' SD3Transformer2DModel at the stand-in's size, on the meta device."""
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):
        return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=DEPTH,
                                     attention_head_dim=64, num_attention_heads=DEPTH, joint_attention_dim=4096,
                                     caption_projection_dim=64 * DEPTH, pooled_projection_dim=2048, out_channels=16,
                                     pos_embed_max_size=32)


FAMILY = Family(
    key="sd3", host_class="SD3", model_sampling="ModelSamplingDiscreteFlow",
    sampling_defaults={"shift": 3.0, "multiplier": 1000},
    sampling_node=("ModelSamplingSD3", {"shift": 3.0}),
    models={"model": MODEL}, vae=VAE_16CH,
    latent=("EmptySD3LatentImage", {"width": 32, "height": 32, "batch_size": 1}), latent_shape=(1, 16, 4, 4),
    notes="CONST prediction; sigma = shift*t/(1+(shift-1)*t), timestep = 1000*sigma.",
    loras=LORAS, lora_layout=lora_layout, diffusers_model=diffusers_model)
