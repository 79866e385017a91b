"""HunyuanVideo (host class ``HunyuanVideo``): 20 double-stream and 40 single-stream blocks at width 3072, plus the
text input's token refiner.

Key formats: the host's own map covers its native names (BFL-style ``double_blocks.0.img_attn.qkv``) and
diffusion-pipe's / musubi-tuner's Tencent names (``transformer.double_blocks.0.img_attn_qkv``, ``img_mod.linear``,
``img_mlp.fc1``; kohya spelling ``lora_unet_double_blocks_0_img_mlp_fc1``). Added here: the Tencent names of the
embedders, and the diffusers names (diffusers ``_convert_hunyuan_video_lora_to_diffusers``, FastVideo's LoRAs) with
to_q / to_k / to_v / proj_mlp as row ranges of the fused ``img_attn.qkv`` / ``txt_attn.qkv`` / ``linear1`` /
token-refiner qkv weights and ``norm_out.linear`` with its halves swapped.

Block weights: BASE (text encoders), IN (img_in, txt_in, time_in, vector_in, guidance_in), D00.., S00.., OUT
(final_layer); or the block values alone.
"""
from __future__ import annotations

from ..layouts import Alias, Family, KeyLayout, Release
from . import dit

D, S, R = r"^double_blocks_(\d+)_", r"^single_blocks_(\d+)_", r"^txt_in_individual_token_refiner_blocks_(\d+)_"
TD, TS = r"transformer_blocks_\1_", r"single_transformer_blocks_\1_"
TR = r"context_embedder_token_refiner_refiner_blocks_\1_"


def _qkv(pattern: str, names: tuple[str, ...]) -> tuple[Alias, ...]:
    return tuple(Alias(pattern, n, rows=(i, 1)) for i, n in enumerate(names))


ALIASES = (
    # Tencent names the host's map lacks (embedders)
    Alias(r"^(time_in|guidance_in)_in_layer$", r"\1_mlp_0"), Alias(r"^(time_in|guidance_in)_out_layer$", r"\1_mlp_2"),
    Alias(r"^txt_in_t_embedder_in_layer$", "txt_in_t_embedder_mlp_0"),
    Alias(r"^txt_in_t_embedder_out_layer$", "txt_in_t_embedder_mlp_2"),
    Alias(r"^txt_in_c_embedder_in_layer$", "txt_in_c_embedder_linear_1"),
    Alias(r"^txt_in_c_embedder_out_layer$", "txt_in_c_embedder_linear_2"),
    # diffusers
    *_qkv(D + r"img_attn_qkv$", (TD + "attn_to_q", TD + "attn_to_k", TD + "attn_to_v")),
    *_qkv(D + r"txt_attn_qkv$", (TD + "attn_add_q_proj", TD + "attn_add_k_proj", TD + "attn_add_v_proj")),
    Alias(D + r"img_attn_proj$", TD + "attn_to_out_0"), Alias(D + r"txt_attn_proj$", TD + "attn_to_add_out"),
    Alias(D + r"img_mod_lin$", TD + "norm1_linear"), Alias(D + r"txt_mod_lin$", TD + "norm1_context_linear"),
    Alias(D + r"img_mlp_0$", TD + "ff_net_0_proj"), Alias(D + r"img_mlp_2$", TD + "ff_net_2"),
    Alias(D + r"txt_mlp_0$", TD + "ff_context_net_0_proj"), Alias(D + r"txt_mlp_2$", TD + "ff_context_net_2"),
    *_qkv(S + r"linear1$", (TS + "attn_to_q", TS + "attn_to_k", TS + "attn_to_v")),
    Alias(S + r"linear1$", TS + "proj_mlp", rows=(3, -1)),
    Alias(S + r"linear2$", TS + "proj_out"), Alias(S + r"modulation_lin$", TS + "norm_linear"),
    Alias(r"^img_in_proj$", "x_embedder_proj"),
    Alias(r"^time_in_in_layer$", "time_text_embed_timestep_embedder_linear_1"),
    Alias(r"^time_in_out_layer$", "time_text_embed_timestep_embedder_linear_2"),
    Alias(r"^guidance_in_in_layer$", "time_text_embed_guidance_embedder_linear_1"),
    Alias(r"^guidance_in_out_layer$", "time_text_embed_guidance_embedder_linear_2"),
    Alias(r"^vector_in_in_layer$", "time_text_embed_text_embedder_linear_1"),
    Alias(r"^vector_in_out_layer$", "time_text_embed_text_embedder_linear_2"),
    Alias(r"^final_layer_linear$", "proj_out"),
    Alias(r"^final_layer_adaLN_modulation_1$", "norm_out_linear", swap_halves=True),
    Alias(r"^txt_in_input_embedder$", "context_embedder_proj_in"),
    Alias(r"^txt_in_t_embedder_in_layer$", "context_embedder_time_text_embed_timestep_embedder_linear_1"),
    Alias(r"^txt_in_t_embedder_out_layer$", "context_embedder_time_text_embed_timestep_embedder_linear_2"),
    Alias(r"^txt_in_c_embedder_in_layer$", "context_embedder_time_text_embed_text_embedder_linear_1"),
    Alias(r"^txt_in_c_embedder_out_layer$", "context_embedder_time_text_embed_text_embedder_linear_2"),
    *_qkv(R + r"self_attn_qkv$", (TR + "attn_to_q", TR + "attn_to_k", TR + "attn_to_v")),
    Alias(R + r"self_attn_proj$", TR + "attn_to_out_0"),
    Alias(R + r"mlp_0$", TR + "ff_net_0_proj"), Alias(R + r"mlp_2$", TR + "ff_net_2"),
    Alias(R + r"adaLN_modulation_1$", TR + "norm_out_linear"),
)

KEYS = KeyLayout(name="hunyuan_video", prefixes=dit.PREFIXES, aliases=ALIASES,
                 block_re=r"^((?:single_|double_)?(?:transformer_)?blocks_\d+|[a-z]+)")

BLOCKS = dit.blocks("hunyuan_video",
                    (("D", "double_blocks", "double block"), ("S", "single_blocks", "single block")),
                    outside_in=("img_in", "txt_in", "time_in", "vector_in", "guidance_in"),
                    outside_out=("final_layer",))

SCHEME = (r"^(double_blocks_\d+_(img|txt)_(mod_lin|mod_linear|attn_qkv|attn_proj|mlp_[02]|mlp_fc[12])|"
          r"single_blocks_\d+_(linear[12]|modulation_lin|modulation_linear)|"
          r"transformer_blocks_\d+_(attn_(to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)|ff(_context)?_net_(0_proj|2)|"
          r"norm1(_context)?_linear)|single_transformer_blocks_\d+_(attn_to_[qkv]|proj_mlp|proj_out|norm_linear)|"
          r"img_in_proj|x_embedder_proj|txt_in_\w+|context_embedder_\w+|(time|vector|guidance)_in_\w+|"
          r"final_layer_(linear|adaLN_modulation_1)|time_text_embed_\w+|norm_out_linear|proj_out)$")

FAMILY = Family(
    "hunyuan_video", "HunyuanVideo", KEYS, BLOCKS, scheme=SCHEME,
    only=(r"^(\w+_(mod_linear|modulation_linear|mlp_fc[12])|txt_in_\w+|context_embedder_\w+|img_in_proj|"
          r"x_embedder_proj|(double_|transformer_)blocks_(19|[2-9]\d|\d{3})_\w+|"
          r"(single_|single_transformer_)blocks_(3[89]|[4-9]\d|\d{3})_\w+)$"),
    releases=(Release(r"fast[-_ ]?video|fast[-_ ]?hunyuan", "fastvideo", "HunyuanVideo FastVideo",
                      "HunyuanVideo FastVideo", targets="attn"),))
