"""Wan 2.1 (1.3B: 30 blocks, width 1536; 14B: 40 blocks, 5120) and the Wan 2.2 A14B experts (host class
``WAN21`` for all), and Wan 2.2 TI2V-5B (``WAN22``, 30 blocks, 3072): one key and block layout.

Key formats: the host's own map covers the native names (``diffusion_model.blocks.0.self_attn.q``: lightx2v,
CausVid, Wan 2.2 Lightning as ComfyUI ships them) and musubi-tuner's kohya names (``lora_unet_blocks_0_self_attn_q``;
Wan-Fun's ``lora_unet__``). The diffusers / PEFT names (``transformer.blocks.0.attn1.to_q``, what diffusers'
training scripts and its Wan LoRA conversion write) are added here as aliases (diffusers
``_convert_non_diffusers_wan_lora_to_diffusers``). The image cross-attention of the image-to-video models
(``cross_attn.k_img`` / ``v_img`` / ``norm_k_img``, ``img_emb``) is absent from text-to-video models: an I2V LoRA's
modules for it are reported in one line, not as unmatched keys.

Block weights: BASE (text encoder), IN (patch_embedding, text_embedding, time_embedding, time_projection, img_emb),
B00.., OUT (head); or the block values alone.
"""
from __future__ import annotations

from ..layouts import Alias, Family, KeyLayout, Release, VariantOnly
from . import dit

B = r"^blocks_(\d+)_"
ALIASES = (
    Alias(B + r"self_attn_([qkv])$", r"blocks_\1_attn1_to_\2"),
    Alias(B + r"self_attn_o$", r"blocks_\1_attn1_to_out_0"),
    Alias(B + r"self_attn_norm_([qk])$", r"blocks_\1_attn1_norm_\2"),
    Alias(B + r"cross_attn_([qkv])$", r"blocks_\1_attn2_to_\2"),
    Alias(B + r"cross_attn_o$", r"blocks_\1_attn2_to_out_0"),
    Alias(B + r"cross_attn_norm_([qk])$", r"blocks_\1_attn2_norm_\2"),
    Alias(B + r"cross_attn_([kv])_img$", r"blocks_\1_attn2_add_\2_proj"),
    Alias(B + r"cross_attn_norm_k_img$", r"blocks_\1_attn2_norm_added_k"),
    Alias(B + r"norm3$", r"blocks_\1_norm2"),
    Alias(B + r"ffn_0$", r"blocks_\1_ffn_net_0_proj"),
    Alias(B + r"ffn_2$", r"blocks_\1_ffn_net_2"),
    Alias(B + r"modulation$", r"blocks_\1_scale_shift_table"),
    Alias(r"^time_embedding_0$", "condition_embedder_time_embedder_linear_1"),
    Alias(r"^time_embedding_2$", "condition_embedder_time_embedder_linear_2"),
    Alias(r"^time_projection_1$", "condition_embedder_time_proj"),
    Alias(r"^text_embedding_0$", "condition_embedder_text_embedder_linear_1"),
    Alias(r"^text_embedding_2$", "condition_embedder_text_embedder_linear_2"),
    Alias(r"^img_emb_proj_0$", "condition_embedder_image_embedder_norm1"),
    Alias(r"^img_emb_proj_1$", "condition_embedder_image_embedder_ff_net_0_proj"),
    Alias(r"^img_emb_proj_3$", "condition_embedder_image_embedder_ff_net_2"),
    Alias(r"^img_emb_proj_4$", "condition_embedder_image_embedder_norm2"),
    Alias(r"^head_head$", "proj_out"),
    Alias(r"^head_modulation$", "scale_shift_table"),
)

KEYS = KeyLayout(
    name="wan", prefixes=dit.PREFIXES, block_re=r"^(blocks_\d+|[a-z]+)", aliases=ALIASES,
    optional=(VariantOnly(r"^blocks_\d+_(cross_attn_(k_img|v_img|norm_k_img)|attn2_(add_[kv]_proj|norm_added_k))$|"
                          r"^(img_emb|condition_embedder_image_embedder)_\w+$",
                          "image-to-video modules (image cross-attention k_img / v_img / norm_k_img, img_emb)"),))

BLOCKS = dit.blocks("wan", (("B", "blocks", "block"),),
                    outside_in=("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb"),
                    outside_out=("head",))

SCHEME = (r"^(blocks_\d+_(self_attn_(q|k|v|o|norm_q|norm_k)|cross_attn_(q|k|v|o|norm_q|norm_k|k_img|v_img|norm_k_img)|"
          r"attn[12]_(to_[qkv]|to_out_0|norm_[qk]|add_[kv]_proj|norm_added_k)|ffn_[02]|ffn_net_(0_proj|2)|norm[23]|"
          r"modulation|scale_shift_table)|patch_embedding|(text|time)_embedding_[02]|time_projection_1|head_head|"
          r"head_modulation|img_emb_proj_\d|condition_embedder_\w+|proj_out|scale_shift_table)$")

RELEASES = (
    Release(r"wan[-_ ]?2[._-]?2.*?(lightning|lightx2v|seko|4[-_ ]?steps?)|lightning.*?a14b|a14b.*?4[-_ ]?steps?",
            "wan22-lightning", "Wan 2.2 Lightning", "Wan 2.2 Lightning 4-step", default_steps=4, experts=True),
    Release(r"lightx2v|step[-_ ]?distill", "lightx2v", "Wan 2.1 lightx2v", "Wan 2.1 lightx2v 4-step",
            default_steps=4),
    Release(r"causvid", "causvid", "Wan 2.1 CausVid", "Wan 2.1 CausVid"),
)

_ONLY = (r"^(blocks_\d+_(self_attn|cross_attn|attn1|attn2|ffn)_\w+|blocks_\d+_(modulation|norm3)|"
         r"(text|time)_embedding_\d|time_projection_1|head_\w+|patch_embedding|img_emb_\w+|condition_embedder_\w+)$")

FAMILIES = (
    Family("wan", "Wan 2.1 / Wan 2.2 A14B", KEYS, BLOCKS, scheme=SCHEME, only=_ONLY, releases=RELEASES),
    Family("wan22_5b", "Wan 2.2 TI2V-5B", KEYS, BLOCKS, scheme=SCHEME, only=_ONLY, widths=(3072,)),
)
