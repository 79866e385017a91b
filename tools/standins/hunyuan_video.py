"""HunyuanVideo T2V (host class ``comfy.model_base.HunyuanVideo``), in the release's own (Tencent) key names.

The host reads the width from ``img_in.proj.weight`` (heads = width / 128, rope axes 16/56/56 fixed) and the two
depths from the block counts.  Width 256 (2 heads), 2 double- and 2 single-stream blocks; context 4096
(llava-llama-3 8B hidden states) and pooled 768 (CLIP-L) are the release's, and ``guidance_in`` the
guidance-distilled T2V model's.  ``vector_in`` must be there: without it the host takes the file for
HunyuanImage 2.1.

The released file keeps Tencent's module names (``img_attn_qkv``, ``img_mod.linear``, ``img_mlp.fc1``,
``txt_in.c_embedder.linear_1``, ``q_norm.weight``, ...), which the host renames on load
(``supported_models.HunyuanVideo.process_unet_state_dict``); ``release_key`` is that renaming run backwards.
The VAE is the host's 3-D AutoencoderKL at its fixed width (128 x [1,2,4,4]).
"""
from __future__ import annotations

import functools
import re

from .dit_loras import LoraFile, native_linears
from .flow import Family, ModelFile, VaeFile

# host name fragment -> Tencent name fragment (the inverse of the host's load-time renames), applied in order
_RELEASE = (
    (r"mlp\.0\.", "mlp.fc1."),
    (r"mlp\.2\.", "mlp.fc2."),
    (r"txt_in\.t_embedder\.in_layer\.", "txt_in.t_embedder.mlp.0."),
    (r"txt_in\.t_embedder\.out_layer\.", "txt_in.t_embedder.mlp.2."),
    (r"txt_in\.c_embedder\.in_layer\.", "txt_in.c_embedder.linear_1."),
    (r"txt_in\.c_embedder\.out_layer\.", "txt_in.c_embedder.linear_2."),
    (r"^(time_in|guidance_in)\.in_layer\.", r"\1.mlp.0."),
    (r"^(time_in|guidance_in)\.out_layer\.", r"\1.mlp.2."),
    (r"_mod\.lin\.", "_mod.linear."),
    (r"\.modulation\.lin\.", ".modulation.linear."),
    (r"_attn\.qkv\.", "_attn_qkv."),
    (r"_attn\.proj\.", "_attn_proj."),
    (r"_attn\.norm\.query_norm\.scale$", "_attn_q_norm.weight"),
    (r"_attn\.norm\.key_norm\.scale$", "_attn_k_norm.weight"),
    (r"\.norm\.query_norm\.scale$", ".q_norm.weight"),
    (r"\.norm\.key_norm\.scale$", ".k_norm.weight"),
)


def release_key(key: str) -> str:
    for pat, rep in _RELEASE:
        key = re.sub(pat, rep, key)
    return key


MODEL = ModelFile(
    name="fewstep-standin-hunyuan_video_t2v_720p_bf16.safetensors",
    config=dict(image_model="hunyuan_video", in_channels=16, patch_size=[1, 2, 2], out_channels=16, vec_in_dim=768,
                axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096, hidden_size=256, mlp_ratio=4.0,
                num_heads=2, depth=2, depth_single_blocks=2, theta=256, qkv_bias=True, byt5=False,
                guidance_embed=True, use_cond_type_embedding=False, vision_in_dim=None),
    mirrors="Comfy-Org/HunyuanVideo_repackaged hunyuan_video_t2v_720p_bf16.safetensors (Tencent names)",
    release_key=release_key)

VAE = VaeFile(
    name="fewstep-standin-hunyuan_video_vae_bf16.safetensors",
    detect={"decoder.conv_in.conv.weight": (512, 16, 3, 3, 3), "post_quant_conv.weight": (16, 16, 1, 1, 1)},
    mirrors="Comfy-Org/HunyuanVideo_repackaged hunyuan_video_vae_bf16.safetensors (decoder.conv_in.conv.* keys)")

# ---------------------------------------------------------------- LoRA files
#
# Both in Tencent's module names, over every linear of the double and single blocks (modulations included):
# * musubi-tuner (kohya-ss/musubi-tuner networks/lora.py for HunyuanVideo): lora_unet_double_blocks_N_img_mlp_fc1
#   + alpha.  Core maps the names that happen to match its own (img_attn_qkv, img_attn_proj, linear1, linear2) and
#   leaves the rest (img_mod_linear, img_mlp_fc1/fc2, modulation_linear) unloaded: musubi's
#   convert_lora.py must be run first (kohya-ss/musubi-tuner#26).
# * diffusion-pipe (tdrussell/diffusion-pipe): transformer.double_blocks.N.img_attn_qkv.lora_A.weight, which core's
#   HunyuanVideo branch reads.  (diffusers' HunyuanVideo converter reads it too, but splits single-block linear1 at
#   the release width 3072, so it cannot check the 256-wide stand-in.)
_BLOCKS = (r"double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.qkv|attn\.proj|mlp\.[02])"
           r"|single_blocks\.\d+\.(linear[12]|modulation\.lin)")
LORAS = (
    LoraFile("style-hunyuan-video-musubi_standin.safetensors", "style", "musubi", "kohya", 8, 4.0, "model",
             "kohya-ss/musubi-tuner HunyuanVideo LoRA (lora_unet_double_blocks_N_img_mlp_fc1)",
             core_drops=(r".*_(mod_linear|mlp_fc[12]|modulation_linear)\..*",)),
    LoraFile("style-hunyuan-video-diffusion-pipe_standin.safetensors", "style", "diffusion-pipe", "peft", 8, None,
             "model", "tdrussell/diffusion-pipe HunyuanVideo LoRA (transformer.double_blocks.N.img_attn_qkv)",
             reference="core"),
)


def lora_layout(lf: LoraFile, host: dict):
    if lf.layout == "musubi":
        return native_linears(host, _BLOCKS, "lora_unet_", rename=release_key, underscore=True), {}, set()
    if lf.layout == "diffusion-pipe":
        return native_linears(host, _BLOCKS, "transformer.", rename=release_key), {}, set()
    raise ValueError(f"{lf.name}: unknown HunyuanVideo LoRA layout {lf.layout!r}")


@functools.lru_cache(maxsize=None)
def diffusers_model(role: str):
    """diffusers' HunyuanVideoTransformer3DModel at the stand-in's size, on the meta device."""
    import torch
    from diffusers import HunyuanVideoTransformer3DModel
    c = MODEL.config
    with torch.device("meta"):
        return HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=c["num_heads"], attention_head_dim=128,
            num_layers=c["depth"], num_single_layers=c["depth_single_blocks"], num_refiner_layers=2, mlp_ratio=4.0,
            patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
            pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56))


FAMILY = Family(
    key="hunyuan_video", host_class="HunyuanVideo", model_sampling="ModelSamplingDiscreteFlow",
    sampling_defaults={"shift": 7.0, "multiplier": 1000},
    sampling_node=("ModelSamplingSD3", {"shift": 7.0}),
    models={"model": MODEL}, vae=VAE,
    latent=("EmptyHunyuanLatentVideo", {"width": 32, "height": 32, "length": 5, "batch_size": 1}),
    latent_shape=(1, 16, 2, 4, 4),
    notes="CONST prediction, shift 7 from the host; guidance from FluxGuidance (6.0 when absent); the VAE's width "
          "is fixed by the host, so frames stay at 32 px.",
    loras=LORAS, lora_layout=lora_layout, diffusers_model=diffusers_model)
