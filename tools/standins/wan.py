"""Wan 2.1 T2V and Wan 2.2 A14B T2V experts (host class ``comfy.model_base.WAN21`` for all three).

The host reads dim from ``head.modulation``, heads = dim / 128, ffn from ``blocks.0.ffn.0.weight`` and the depth
from the block count; text width 4096 (umT5-XXL) is fixed.  Two widths keep the real compatibility rule (a LoRA for
the 1.3B model does not fit the 14B ones, a Wan 2.1 14B LoRA fits the Wan 2.2 experts):

* ``t2v``: 1.3B-style layout, dim 128 (1 head), ffn 384, 2 blocks;
* ``high_noise`` / ``low_noise``: the 14B layout of the two Wan 2.2 A14B experts, dim 256 (2 heads), ffn 768,
  2 blocks, one file each with its own seed.

Both decode with the Wan 2.1 VAE (``vae.py`` of the Wan repository), whose width the host reads from the file;
dim 8 (the release has 96) decodes a few tiny frames in about a second on a CPU.
"""
from __future__ import annotations

import functools

from .dit_loras import LoraFile, diffusers_linears, native_linears
from .flow import Family, ModelFile, VaeFile


def _config(dim: int, ffn: int, layers: int) -> dict:
    return dict(image_model="wan2.1", dim=dim, out_dim=16, num_heads=dim // 128, ffn_dim=ffn, num_layers=layers,
                patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                eps=1e-6, in_dim=16, model_type="t2v")


T2V = ModelFile(name="fewstep-standin-wan2.1_t2v_1.3B_bf16.safetensors", config=_config(128, 384, 2),
                mirrors="Comfy-Org/Wan_2.1_ComfyUI_repackaged wan2.1_t2v_1.3B_bf16.safetensors (Wan names)")
HIGH = ModelFile(name="fewstep-standin-wan2.2_t2v_high_noise_14B_bf16.safetensors", config=_config(256, 768, 2),
                 mirrors="Comfy-Org/Wan_2.2_ComfyUI_Repackaged wan2.2_t2v_high_noise_14B_fp16.safetensors")
LOW = ModelFile(name="fewstep-standin-wan2.2_t2v_low_noise_14B_bf16.safetensors", config=_config(256, 768, 2),
                mirrors="Comfy-Org/Wan_2.2_ComfyUI_Repackaged wan2.2_t2v_low_noise_14B_fp16.safetensors")

VAE_DIM = 8
WAN21_VAE = VaeFile(
    name="fewstep-standin-wan_2.1_vae.safetensors",
    detect={"decoder.middle.0.residual.0.gamma": (4 * VAE_DIM, 1, 1, 1), "decoder.head.0.gamma": (VAE_DIM, 1, 1, 1)},
    mirrors="Comfy-Org/Wan_2.1_ComfyUI_repackaged wan_2.1_vae.safetensors (encoder.*, decoder.*, conv1, conv2)")

# ---------------------------------------------------------------- LoRA files
#
# lightx2v step-distill (Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64, lightx2v/Wan2.1-T2V-14B-StepDistill-
#   CfgDistill-Lightx2v "loras/"): written by LightX2V's tools/extract/lora_extractor.py from the distilled-minus-base
#   difference: rank-64 SVD (lora_up / lora_down, no alpha) of every 2-D weight of 1 M parameters or more, the whole
#   difference of smaller ones (".diff": head.head and patch_embedding at 14B size) and of every 1-D weight (norm
#   scales), ".diff_b" for biases and ".diff_m" for the modulation tables (blocks.N.modulation -> blocks.N.diff_m).
#   The stand-in keeps that split module by module (not by its own, tiny, parameter counts).
# CausVid (Kijai/WanVideo_comfy Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32): rank 32 on every block linear and the
#   text/time embeddings, time projection and head, ".diff_b" biases, and norm ".diff" keys that are all zero (as
#   diffusers' Wan converter notes); fits the 1.3B-style model.
# Wan 2.2 Lightning (lightx2v/Wan2.2-Lightning Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1 high_noise_model /
#   low_noise_model): trained LoRA, lora_down / lora_up + alpha on the attention and FFN linears of every block.  The
#   alpha value (32 here) is not documented publicly; the keys are what diffusers' Wan converter and LightX2V's
#   convert_lightning_to_x2v_lora read.
# Style files: diffusers / PEFT names (transformer.blocks.N.attn1.to_q.lora_A.weight, as diffusers' WanTransformer3D
#   saves), musubi-tuner (lora_unet_blocks_N_self_attn_q + alpha), and a Wan 2.1 I2V LoRA (Kijai format with the
#   image cross-attention keys k_img / v_img / norm_k_img) loaded on the T2V model, as users do.
_CONV = "_convert_non_diffusers_wan_lora_to_diffusers"  # diffusers' reader of the diffusion_model.* Wan layouts
_BLOCK = r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]"
_GLOBAL = r"text_embedding\.[02]|time_embedding\.[02]|time_projection\.1"

LORAS = (
    LoraFile("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64_standin.safetensors", "acceleration", "lightx2v",
             "kohya", 64, None, "high_noise",
             "lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v loras/ (LightX2V lora_extractor layout)",
             core_drops=(r".*\.diff_m",), reference=_CONV),
    LoraFile("Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32_standin.safetensors", "acceleration", "causvid", "kohya",
             32, None, "t2v", "Kijai/WanVideo_comfy Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32",
             reference=_CONV),
    LoraFile("Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1_high_noise_model_standin.safetensors", "acceleration",
             "lightning", "kohya", 64, 32.0, "high_noise",
             "lightx2v/Wan2.2-Lightning Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors",
             reference=_CONV),
    LoraFile("Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1_low_noise_model_standin.safetensors", "acceleration",
             "lightning", "kohya", 64, 32.0, "low_noise",
             "lightx2v/Wan2.2-Lightning Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/low_noise_model.safetensors",
             reference=_CONV),
    LoraFile("style-wan-diffusers-peft_standin.safetensors", "style", "diffusers", "peft", 8, None, "high_noise",
             "diffusers / PEFT Wan LoRA (WanTransformer3DModel names, transformer. prefix)", core_drops=(".*",)),
    LoraFile("style-wan-musubi_standin.safetensors", "style", "musubi", "kohya", 8, 4.0, "t2v",
             "kohya-ss/musubi-tuner networks/lora_wan (lora_unet_blocks_N_...)",
             reference="_convert_musubi_wan_lora_to_diffusers"),
    LoraFile("style-wan21-i2v-kijai_standin.safetensors", "style", "i2v", "kohya", 8, None, "high_noise",
             "a Wan 2.1 I2V LoRA in Kijai's diffusion_model.* layout (k_img / v_img / norm_k_img keys)",
             core_drops=(r".*_img\..*",), reference=_CONV),
)


def lora_layout(lf: LoraFile, host: dict):
    """Modules (base name -> shape), extras (key -> shape) and the extras that are zeros, per layout."""
    dm = "diffusion_model."
    if lf.layout == "lightning":
        return native_linears(host, _BLOCK, dm), {}, set()
    if lf.layout == "musubi":
        return native_linears(host, _BLOCK, "lora_unet_", underscore=True), {}, set()
    if lf.layout == "diffusers":
        model = diffusers_model(lf.target)
        include = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"
        return diffusers_linears(model, include), {}, set()
    if lf.layout == "i2v":
        mods = native_linears(host, _BLOCK, dm)
        extras = {}
        for i in sorted({int(k.split(".")[1]) for k in host if k.startswith("blocks.")}):
            shape = host[f"blocks.{i}.cross_attn.k.weight"].shape
            for m in ("k_img", "v_img"):
                mods[f"{dm}blocks.{i}.cross_attn.{m}"] = tuple(shape)
                extras[f"{dm}blocks.{i}.cross_attn.{m}.diff_b"] = (shape[0],)
            extras[f"{dm}blocks.{i}.cross_attn.norm_k_img.diff"] = (shape[0],)
        return mods, extras, set()
    if lf.layout in ("lightx2v", "causvid"):
        x2v = lf.layout == "lightx2v"
        mods = native_linears(host, _BLOCK + "|" + _GLOBAL + ("" if x2v else r"|head\.head"), dm)
        extras, zeros = {}, set()
        for k, v in host.items():
            base, leaf = k.rsplit(".", 1)
            if leaf == "bias" and (x2v or dm + base in mods):
                extras[f"{dm}{base}.diff_b"] = tuple(v.shape)
            elif leaf == "weight" and dm + base not in mods and (v.ndim == 1 or x2v):  # norms; head, patch embedding
                extras[f"{dm}{base}.diff"] = tuple(v.shape)
                if not x2v:
                    zeros.add(f"{dm}{base}.diff")
            elif leaf == "modulation" and x2v:
                extras[f"{dm}{base}.diff_m"] = tuple(v.shape)
        return mods, extras, zeros
    raise ValueError(f"{lf.name}: unknown Wan LoRA layout {lf.layout!r}")


@functools.lru_cache(maxsize=None)
def diffusers_model(role: str):
    """diffusers' WanTransformer3DModel at the size of the `role` stand-in, on the meta device: the I2V variant
    (the T2V modules plus the image cross-attention projections add_k_proj / add_v_proj), so that the names of I2V
    LoRAs can be checked against it as well."""
    import torch
    from diffusers import WanTransformer3DModel
    c = {"t2v": T2V, "high_noise": HIGH, "low_noise": LOW}[role].config
    with torch.device("meta"):
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=c["num_heads"], attention_head_dim=128,
                                     in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=c["ffn_dim"],
                                     num_layers=c["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     eps=1e-6, image_dim=1280, added_kv_proj_dim=c["dim"])


FAMILY = Family(
    key="wan", host_class="WAN21", model_sampling="ModelSamplingDiscreteFlow",
    sampling_defaults={"shift": 8.0, "multiplier": 1000},
    sampling_node=("ModelSamplingSD3", {"shift": 8.0}),
    models={"t2v": T2V, "high_noise": HIGH, "low_noise": LOW}, vae=WAN21_VAE,
    latent=("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 5, "batch_size": 1}),
    latent_shape=(1, 16, 2, 8, 8),
    notes="CONST prediction, shift 8 from the host (workflows set 5-8 with ModelSamplingSD3); 4n+1 frames -> "
          "n+1 latent frames.",
    loras=LORAS, lora_layout=lora_layout, diffusers_model=diffusers_model)
