"""Qwen-Image (host class ``QwenImage``): 60 transformer blocks at width 3072, diffusers module names.

Key formats: the host's own map covers the bare names (``transformer_blocks.0.attn.to_q``: Qwen-Image-Lightning),
``transformer.*``, ``diffusion_model.*``, kohya (``lora_unet_*``) and LyCORIS names; the model's names are the
diffusers ones, so nothing is added here.

Block weights: BASE (text encoder), IN (img_in, txt_in, txt_norm, time_text_embed), B00..B59, OUT (norm_out,
proj_out); or the 60 block values alone.
"""
from __future__ import annotations

from ..layouts import Family, KeyLayout, Release
from . import dit

KEYS = KeyLayout(name="qwen_image", prefixes=dit.PREFIXES, block_re=r"^(transformer_blocks_\d+|[a-z]+)")

BLOCKS = dit.blocks("qwen_image", (("B", "transformer_blocks", "transformer block"),),
                    outside_in=("img_in", "txt_in", "txt_norm", "time_text_embed"),
                    outside_out=("norm_out", "proj_out"))

FAMILY = Family(
    "qwen_image", "Qwen-Image", KEYS, BLOCKS,
    scheme=(r"^(transformer_blocks_\d+_(attn_(to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out|norm_\w+)|"
            r"(img|txt)_mod_1|(img|txt)_mlp_net_(0_proj|2))|img_in|txt_in|txt_norm|time_text_embed_\w+|"
            r"norm_out_linear|proj_out)$"),
    only=r"^(transformer_blocks_\d+_((img|txt)_mod_1|(img|txt)_mlp_net_(0_proj|2))|txt_norm)$",
    releases=(
        Release(r"qwen[-_ ]?image.*?lightning.*?(?P<steps>\d+)[-_ ]?steps?", "qwen-image-lightning",
                "Qwen-Image-Lightning", "Qwen-Image-Lightning {steps}-step", steps=(4, 8)),
    ))
