"""FLUX.1 (host class ``Flux``): 19 double-stream and 38 single-stream blocks at width 3072.

Key formats: the host's own map covers BFL names (``diffusion_model.double_blocks.0.img_attn.qkv``, kohya
``lora_unet_double_blocks_0_img_attn_qkv``) and diffusers / ai-toolkit / SimpleTuner (``transformer.*``), OneTrainer
(``lora_transformer_*``) and LyCORIS names, with diffusers' separate to_q / to_k / to_v / proj_mlp as row ranges of
the fused ``img_attn.qkv`` / ``txt_attn.qkv`` / ``linear1`` weights and ``norm_out.linear`` with its two halves
swapped (``comfy.utils.flux_to_diffusers``) -- nothing to add here.

Block weights follow LoRA-Block-Weight's Flux vector: CLIP, T5, IN (img_in, txt_in, time_in, vector_in,
guidance_in), D00..D18, S00..S37, OUT (final_layer) = 61 values; or the 57 block values alone.
"""
from __future__ import annotations

from ..layouts import Family, KeyLayout, Release
from . import dit

KEYS = KeyLayout(name="flux", prefixes=dit.PREFIXES,
                 block_re=r"^((?:single_|double_)?(?:transformer_)?blocks_\d+|[a-z]+)")

BLOCKS = dit.blocks("flux", (("D", "double_blocks", "double block"), ("S", "single_blocks", "single block")),
                    outside_in=("img_in", "txt_in", "time_in", "vector_in", "guidance_in"),
                    outside_out=("final_layer",), te_slots=("CLIP", "T5"))

SCHEME = (r"^(double_blocks_\d+_(img|txt)_(mod_lin|attn_qkv|attn_proj|mlp_[02])|"
          r"single_blocks_\d+_(linear[12]|linear1_qkv|modulation_lin)|"
          r"transformer_blocks_\d+_(attn_(to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)|ff(_context)?_net_(0_proj|2)|"
          r"norm1(_context)?_linear)|single_transformer_blocks_\d+_(attn_to_[qkv]|proj_mlp|proj_out|norm_linear)|"
          r"img_in|txt_in|(time|vector|guidance)_in_(in|out)_layer|final_layer_(linear|adaLN_modulation_1)|"
          r"x_embedder|context_embedder|time_text_embed_\w+|norm_out_linear|proj_out)$")

FAMILY = Family(
    "flux", "Flux", KEYS, BLOCKS, scheme=SCHEME,
    only=r"^(img_in|txt_in|x_embedder|single_blocks_\d+_linear1_qkv|time_text_embed_guidance_embedder_\w+)$",
    releases=(
        Release(r"hyper[-_ ]?flux.*?(?P<steps>\d+)[-_ ]?steps?", "hyper-flux", "Hyper-FLUX",
                "Hyper-FLUX {steps}-step", steps=(8, 16)),
        Release(r"turbo[-_ ]?alpha", "flux-turbo-alpha", "FLUX.1 Turbo-Alpha", "FLUX.1 Turbo-Alpha 8-step",
                default_steps=8),
    ))
