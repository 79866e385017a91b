"""FLUX.1-dev (host class ``comfy.model_base.Flux``): one double and one single block at the release width.

The host fixes 24 heads and rope axes (16, 56, 56) for "flux" (``detect_unet_config``), so the head dim is 128 and
the width 3072: only the depth is free.  One double-stream and one single-stream block (about 0.55 B parameters,
1.1 GB in bf16) is the smallest the host accepts.  ``guidance_in`` makes it the guidance-distilled dev model
(``Flux``, not ``FluxSchnell``); context 4096 (T5-XXL) and pooled 768 (CLIP-L) are the release's.
"""
from __future__ import annotations

import functools

from .dit_loras import LoraFile, diffusers_linears, native_linears
from .flow import Family, ModelFile
from .sd3 import VAE_16CH

MODEL = ModelFile(
    name="fewstep-standin-flux1-dev.safetensors",
    config=dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
                qkv_bias=True, in_channels=16, hidden_size=3072, context_in_dim=4096, patch_size=2, vec_in_dim=768,
                depth=1, depth_single_blocks=1, guidance_embed=True),
    mirrors="black-forest-labs/FLUX.1-dev flux1-dev.safetensors (BFL names, no prefix)")

# ---------------------------------------------------------------- LoRA files
#
# FLUX.1-Turbo-Alpha (alimama-creative/FLUX.1-Turbo-Alpha diffusion_pytorch_model.safetensors): diffusers / PEFT
#   names (transformer.transformer_blocks.N.attn.to_q.lora_A.weight, ...), rank 64 on every linear of every block,
#   the adaLN norm linears included (that coverage at rank 64 in bf16 is the release's 0.69 GB).
# Hyper-FLUX.1-dev-8steps-lora (ByteDance/Hyper-SD): the same diffusers layout and coverage (its 1.4 GB is that
#   coverage at rank 64 in fp32, which the stand-in keeps).
# ai-toolkit style (ostris/ai-toolkit): diffusers names with q / k / v split (core fuses them into the qkv weight
#   with offsets), attention and MLP linears, no alpha.
# kohya sd-scripts style (networks/lora_flux.py): BFL names, lora_unet_double_blocks_N_img_attn_qkv + alpha, every
#   linear of the double and single blocks, modulations included.
# OneTrainer style: lora_transformer_ + diffusers names with underscores, kohya suffixes + alpha.
_DIFF_ATTN_FF = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
                 r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
                 r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)")
_KOHYA_CONV = "_convert_kohya_flux_lora_to_diffusers"

LORAS = (
    LoraFile("FLUX.1-Turbo-Alpha_standin.safetensors", "acceleration", "all-blocks", "peft", 64, None, "model",
             "alimama-creative/FLUX.1-Turbo-Alpha diffusion_pytorch_model.safetensors", reference="diffusers"),
    LoraFile("Hyper-FLUX.1-dev-8steps-lora_standin.safetensors", "acceleration", "all-blocks", "peft", 64, None,
             "model", "ByteDance/Hyper-SD Hyper-FLUX.1-dev-8steps-lora.safetensors", reference="diffusers",
             dtype=__import__("torch").float32),
    LoraFile("style-flux-ai-toolkit_standin.safetensors", "style", "attn-ff", "peft", 8, None, "model",
             "ostris/ai-toolkit Flux LoRA (transformer.* diffusers names, split q/k/v)", reference="diffusers"),
    LoraFile("style-flux-kohya_standin.safetensors", "style", "kohya", "kohya", 8, 4.0, "model",
             "kohya-ss/sd-scripts networks/lora_flux.py (lora_unet_double_blocks_N_...)", reference=_KOHYA_CONV),
    LoraFile("style-flux-onetrainer_standin.safetensors", "style", "onetrainer", "kohya", 8, 8.0, "model",
             "Nerogar/OneTrainer Flux LoRA (lora_transformer_transformer_blocks_N_...)", reference="core"),
)


def lora_layout(lf: LoraFile, host: dict):
    if lf.layout == "all-blocks":
        return diffusers_linears(diffusers_model(lf.target), r"(single_)?transformer_blocks\.\d+\..*"), {}, set()
    if lf.layout == "attn-ff":
        return diffusers_linears(diffusers_model(lf.target), _DIFF_ATTN_FF), {}, set()
    if lf.layout == "onetrainer":
        return diffusers_linears(diffusers_model(lf.target), _DIFF_ATTN_FF, "lora_transformer_", True), {}, set()
    if lf.layout == "kohya":
        include = (r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
                   r"|single_blocks\.\d+\.(linear[12]|modulation\.lin)")
        return native_linears(host, include, "lora_unet_", underscore=True), {}, set()
    raise ValueError(f"{lf.name}: unknown Flux LoRA layout {lf.layout!r}")


@functools.lru_cache(maxsize=None)
def diffusers_model(role: str):
    """diffusers' FluxTransformer2DModel at the stand-in's size, on the meta device."""
    import torch
    from diffusers import FluxTransformer2DModel
    c = MODEL.config
    with torch.device("meta"):
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=c["depth"],
                                      num_single_layers=c["depth_single_blocks"], attention_head_dim=128,
                                      num_attention_heads=c["num_heads"], joint_attention_dim=c["context_in_dim"],
                                      pooled_projection_dim=c["vec_in_dim"], guidance_embeds=True)


FAMILY = Family(
    key="flux", host_class="Flux", model_sampling="ModelSamplingFlux",
    sampling_defaults={"shift": 1.15},
    sampling_node=("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 32, "height": 32}),
    models={"model": MODEL}, vae=VAE_16CH,
    latent=("EmptySD3LatentImage", {"width": 32, "height": 32, "batch_size": 1}), latent_shape=(1, 16, 4, 4),
    notes="CONST prediction; sigma = e^mu/(e^mu + 1/t - 1), timestep = sigma; guidance from FluxGuidance "
          "(3.5 when absent).",
    loras=LORAS, lora_layout=lora_layout, diffusers_model=diffusers_model)
