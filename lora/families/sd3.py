"""Stable Diffusion 3 / 3.5 (host class ``SD3``, MMDiT): joint blocks (24 in SD3-Medium, 38 in SD3.5-Large).

Key formats: the host's own map covers the native ``joint_blocks.*`` names (generic and kohya) and diffusers
(``transformer.*``), PEFT (``base_model.model.*``: Flash-SD3, Hyper-SD3), OneTrainer (``lora_transformer_*``) and
LyCORIS names, with diffusers' to_q / to_k / to_v as row ranges of the fused qkv weights and the last block's
context modulation with its halves swapped (``comfy.utils.mmdit_to_diffusers``).

Block weights: BASE (text encoders), IN (x_embedder, context_embedder, t_embedder, y_embedder, pos_embed), J00..,
OUT (final_layer); or the block values alone.
"""
from __future__ import annotations

from ..layouts import Family, KeyLayout, Release
from . import dit

KEYS = KeyLayout(name="sd3", prefixes=dit.PREFIXES, block_re=r"^((?:joint_|transformer_)blocks_\d+|[a-z]+)")

BLOCKS = dit.blocks("sd3", (("J", "joint_blocks", "joint block"),),
                    outside_in=("x_embedder", "context_embedder", "t_embedder", "y_embedder", "pos_embed"),
                    outside_out=("final_layer",))

SCHEME = (r"^(joint_blocks_\d+_(x_block|context_block)_\w+|"
          r"transformer_blocks_\d+_(attn2?_(to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)|ff(_context)?_net_(0_proj|2)|"
          r"norm1(_context)?_linear)|x_embedder_proj|context_embedder|t_embedder_mlp_[02]|y_embedder_mlp_[02]|"
          r"time_text_embed_\w+|final_layer_(linear|adaLN_modulation_1)|norm_out_linear|proj_out|pos_embed_proj)$")

FAMILY = Family(
    "sd3", "SD3", KEYS, BLOCKS, scheme=SCHEME,
    only=r"^(joint_blocks_\d+_\w+|t_embedder_\w+|y_embedder_\w+|pos_embed_proj|transformer_blocks_\d+_attn2_\w+)$",
    releases=(
        Release(r"hyper[-_ ]?sd3.*?(?P<steps>\d+)[-_ ]?steps?", "hyper-sd3", "Hyper-SD3", "Hyper-SD3 {steps}-step",
                steps=(4, 8, 16)),
        Release(r"p[cd]m[-_ ]?stochastic", "pcm-sd3", "PCM-SD3 stochastic", "PCM-SD3 stochastic 4-step",
                default_steps=4, targets="attn"),
        Release(r"pcm[-_ ]?(sd3[-_ ]?)?deterministic[-_ ]?(?P<steps>\d+)[-_ ]?steps?", "pcm-sd3", "PCM-SD3",
                "PCM-SD3 {steps}-step", steps=(4,), targets="attn"),
    ))
