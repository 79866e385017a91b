"""Small DiT models built by the host's own model classes, and LoRA files in each trainer's key format for them.

``small_model(family)`` builds a real host model (``comfy.supported_models`` config -> ``get_model`` -> the host's
``ModelPatcher``) with a small width and 2 blocks per stack, weights seeded (N(0, 1/fan_in), biases 0, norm scales
1).

``FORMATS[family][fmt]`` lists, spelled out by hand from the trainers' and converters' own names (diffusers
``lora_conversion_utils``, ComfyUI ``comfy/utils.py``, the releases), which module name of that format lands on which
model weight -- independently of ``lora.families`` -- as (module name, model weight path, part): part ``None`` = the
whole weight, ``(start, size)`` rows in units of the weight's input width (size -1: to the end), ``"swap"`` = the two
row halves in the other order (diffusers' (scale, shift) modulation). ``write_lora`` writes a file of a format with
seeded factors and returns, per model weight, the float64 delta it must add at strength 1 (the independent
reference); the style of the tensor names (kohya ``lora_down``/``lora_up`` + ``.alpha``, PEFT ``lora_A``/``lora_B``)
comes with the format.
"""
from __future__ import annotations

import torch

SMALL_HIDDEN = 64
_FLUXLIKE = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 64, "hidden_size": 64,
             "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
             "qkv_bias": True}
CONFIGS = {  # family -> (comfy.supported_models class, extra unet_config)
    "flux": ("Flux", {**_FLUXLIKE, "theta": 10000, "patch_size": 2, "guidance_embed": True}),
    "hunyuan_video": ("HunyuanVideo", {**_FLUXLIKE, "theta": 256, "patch_size": [1, 2, 2], "guidance_embed": True,
                                       "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
                                       "vision_in_dim": None}),
    "sd3": ("SD3", {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
                    "adm_in_channels": 2048, "context_embedder_config": {
                        "target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
                    "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
                    "x_block_self_attn_layers": []}),
    "wan": ("WAN21_T2V", {"dim": 64, "ffn_dim": 128, "num_heads": 1, "num_layers": 2, "text_dim": 64,
                          "freq_dim": 32, "in_dim": 16, "out_dim": 16}),
    "wan_i2v": ("WAN21_I2V", {"dim": 64, "ffn_dim": 128, "num_heads": 1, "num_layers": 2, "text_dim": 64,
                              "freq_dim": 32, "in_dim": 36, "out_dim": 16}),
    "qwen_image": ("QwenImage", {"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                                 "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12)}),
}
HIDDEN = {"flux": 64, "hunyuan_video": 64, "sd3": 128, "wan": 64, "wan_i2v": 64, "qwen_image": 64}


def fill(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if k.endswith("bias"):
            out[k] = torch.zeros(v.shape)
        elif v.ndim <= 1 or k.endswith((".scale", "modulation", "scale_shift_table")):
            out[k] = torch.ones(v.shape) if v.ndim <= 1 else torch.randn(v.shape, generator=g) * 0.1
        else:
            fan_in = max(1, v[0].numel())
            out[k] = torch.randn(v.shape, generator=g) / fan_in ** 0.5
    return out


def small_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A host ModelPatcher of ``family`` (a ``CONFIGS`` key) with seeded weights in ``dtype``."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    name, extra = CONFIGS[family]
    cls = getattr(sm, name)
    cfg = cls({**cls.unet_config, **extra})
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    model.requires_grad_(False)
    sd = model.diffusion_model.state_dict()
    values = fill(sd, seed)
    with torch.no_grad():
        for k, p in model.diffusion_model.named_parameters():
            p.data = values[k].to(dtype if p.ndim >= 2 else torch.float32)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


# (module name, model weight path, part) -- see the module doc
Q, K, V = (0, 1), (1, 1), (2, 1)
FORMATS: dict[str, dict[str, list]] = {
    "flux": {
        "bfl": [("diffusion_model.double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv", None),
                ("diffusion_model.double_blocks.1.txt_mlp.0", "double_blocks.1.txt_mlp.0", None),
                ("diffusion_model.single_blocks.0.linear1", "single_blocks.0.linear1", None),
                ("diffusion_model.single_blocks.1.linear2", "single_blocks.1.linear2", None),
                ("diffusion_model.final_layer.linear", "final_layer.linear", None),
                ("diffusion_model.img_in", "img_in", None)],
        "kohya": [("lora_unet_double_blocks_0_img_attn_proj", "double_blocks.0.img_attn.proj", None),
                  ("lora_unet_double_blocks_1_txt_mod_lin", "double_blocks.1.txt_mod.lin", None),
                  ("lora_unet_single_blocks_1_linear1", "single_blocks.1.linear1", None),
                  ("lora_unet_single_blocks_0_modulation_lin", "single_blocks.0.modulation.lin", None)],
        "diffusers": [("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", Q),
                      ("transformer.transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv", K),
                      ("transformer.transformer_blocks.0.attn.to_v", "double_blocks.0.img_attn.qkv", V),
                      ("transformer.transformer_blocks.1.attn.add_q_proj", "double_blocks.1.txt_attn.qkv", Q),
                      ("transformer.transformer_blocks.1.attn.to_out.0", "double_blocks.1.img_attn.proj", None),
                      ("transformer.transformer_blocks.0.ff.net.0.proj", "double_blocks.0.img_mlp.0", None),
                      ("transformer.transformer_blocks.0.norm1.linear", "double_blocks.0.img_mod.lin", None),
                      ("transformer.single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1", Q),
                      ("transformer.single_transformer_blocks.0.attn.to_v", "single_blocks.0.linear1", V),
                      ("transformer.single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1", (3, -1)),
                      ("transformer.single_transformer_blocks.1.proj_out", "single_blocks.1.linear2", None),
                      ("transformer.norm_out.linear", "final_layer.adaLN_modulation.1", "swap"),
                      ("transformer.x_embedder", "img_in", None),
                      ("transformer.context_embedder", "txt_in", None)],
        "onetrainer": [("lora_transformer_transformer_blocks_1_attn_to_k", "double_blocks.1.img_attn.qkv", K),
                       ("lora_transformer_single_transformer_blocks_1_proj_mlp", "single_blocks.1.linear1", (3, -1)),
                       ("lora_transformer_transformer_blocks_0_ff_context_net_2", "double_blocks.0.txt_mlp.2",
                        None)],
    },
    "sd3": {
        "kohya": [("lora_unet_joint_blocks_0_x_block_attn_qkv", "joint_blocks.0.x_block.attn.qkv", None),
                  ("lora_unet_joint_blocks_1_x_block_mlp_fc2", "joint_blocks.1.x_block.mlp.fc2", None),
                  ("lora_unet_joint_blocks_0_context_block_adaLN_modulation_1",
                   "joint_blocks.0.context_block.adaLN_modulation.1", None)],
        "diffusers": [("transformer.transformer_blocks.0.attn.to_q", "joint_blocks.0.x_block.attn.qkv", Q),
                      ("transformer.transformer_blocks.0.attn.to_v", "joint_blocks.0.x_block.attn.qkv", V),
                      ("transformer.transformer_blocks.0.attn.add_k_proj", "joint_blocks.0.context_block.attn.qkv",
                       K),
                      ("transformer.transformer_blocks.0.attn.to_out.0", "joint_blocks.0.x_block.attn.proj", None),
                      ("transformer.transformer_blocks.1.ff.net.0.proj", "joint_blocks.1.x_block.mlp.fc1", None),
                      ("transformer.transformer_blocks.0.ff_context.net.2", "joint_blocks.0.context_block.mlp.fc2",
                       None),
                      ("transformer.transformer_blocks.1.norm1_context.linear",
                       "joint_blocks.1.context_block.adaLN_modulation.1", "swap")],
        "peft": [("base_model.model.transformer_blocks.1.attn.to_k", "joint_blocks.1.x_block.attn.qkv", K),
                 ("base_model.model.transformer_blocks.0.norm1.linear", "joint_blocks.0.x_block.adaLN_modulation.1",
                  None)],
        "onetrainer": [("lora_transformer_transformer_blocks_1_attn_to_q", "joint_blocks.1.x_block.attn.qkv", Q)],
    },
    "wan": {
        "native": [("diffusion_model.blocks.0.self_attn.q", "blocks.0.self_attn.q", None),
                   ("diffusion_model.blocks.0.cross_attn.o", "blocks.0.cross_attn.o", None),
                   ("diffusion_model.blocks.1.ffn.0", "blocks.1.ffn.0", None),
                   ("diffusion_model.blocks.1.ffn.2", "blocks.1.ffn.2", None),
                   ("diffusion_model.head.head", "head.head", None),
                   ("diffusion_model.time_embedding.0", "time_embedding.0", None),
                   ("diffusion_model.text_embedding.2", "text_embedding.2", None),
                   ("diffusion_model.time_projection.1", "time_projection.1", None)],
        "musubi": [("lora_unet_blocks_0_self_attn_k", "blocks.0.self_attn.k", None),
                   ("lora_unet_blocks_1_cross_attn_v", "blocks.1.cross_attn.v", None),
                   ("lora_unet_blocks_0_ffn_2", "blocks.0.ffn.2", None)],
        "diffusers": [("transformer.blocks.0.attn1.to_q", "blocks.0.self_attn.q", None),
                      ("transformer.blocks.1.attn1.to_out.0", "blocks.1.self_attn.o", None),
                      ("transformer.blocks.0.attn2.to_k", "blocks.0.cross_attn.k", None),
                      ("transformer.blocks.1.ffn.net.0.proj", "blocks.1.ffn.0", None),
                      ("transformer.blocks.0.ffn.net.2", "blocks.0.ffn.2", None),
                      ("transformer.condition_embedder.time_embedder.linear_1", "time_embedding.0", None),
                      ("transformer.condition_embedder.text_embedder.linear_2", "text_embedding.2", None),
                      ("transformer.condition_embedder.time_proj", "time_projection.1", None),
                      ("transformer.proj_out", "head.head", None)],
        "i2v": [("lora_unet_blocks_0_cross_attn_q", "blocks.0.cross_attn.q", None),
                ("lora_unet_blocks_0_cross_attn_k_img", "blocks.0.cross_attn.k_img", None),
                ("lora_unet_blocks_1_cross_attn_v_img", "blocks.1.cross_attn.v_img", None)],
    },
    "qwen_image": {
        "lightning": [("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q", None),
                      ("transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_k_proj", None),
                      ("transformer_blocks.1.img_mod.1", "transformer_blocks.1.img_mod.1", None),
                      ("transformer_blocks.1.txt_mlp.net.2", "transformer_blocks.1.txt_mlp.net.2", None)],
        "diffusers": [("transformer.transformer_blocks.1.img_mlp.net.0.proj",
                       "transformer_blocks.1.img_mlp.net.0.proj", None),
                      ("transformer.transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn.to_add_out",
                       None),
                      ("transformer.img_in", "img_in", None)],
        "kohya": [("lora_unet_transformer_blocks_0_attn_to_out_0", "transformer_blocks.0.attn.to_out.0", None),
                  ("lora_unet_transformer_blocks_1_txt_mod_1", "transformer_blocks.1.txt_mod.1", None)],
    },
    "hunyuan_video": {
        "musubi": [("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", None),
                   ("lora_unet_double_blocks_0_img_mlp_fc1", "double_blocks.0.img_mlp.0", None),
                   ("lora_unet_double_blocks_1_txt_mod_linear", "double_blocks.1.txt_mod.lin", None),
                   ("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1", None),
                   ("lora_unet_single_blocks_1_modulation_linear", "single_blocks.1.modulation.lin", None)],
        "diffusion_pipe": [("transformer.double_blocks.1.img_attn_qkv", "double_blocks.1.img_attn.qkv", None),
                           ("transformer.double_blocks.0.txt_attn_proj", "double_blocks.0.txt_attn.proj", None),
                           ("transformer.single_blocks.1.linear2", "single_blocks.1.linear2", None)],
        "diffusers": [("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", Q),
                      ("transformer.transformer_blocks.0.attn.add_v_proj", "double_blocks.0.txt_attn.qkv", V),
                      ("transformer.transformer_blocks.1.attn.to_out.0", "double_blocks.1.img_attn.proj", None),
                      ("transformer.transformer_blocks.1.ff.net.0.proj", "double_blocks.1.img_mlp.0", None),
                      ("transformer.transformer_blocks.0.norm1_context.linear", "double_blocks.0.txt_mod.lin", None),
                      ("transformer.single_transformer_blocks.0.attn.to_k", "single_blocks.0.linear1", K),
                      ("transformer.single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1", (3, -1)),
                      ("transformer.single_transformer_blocks.1.proj_out", "single_blocks.1.linear2", None),
                      ("transformer.norm_out.linear", "final_layer.adaLN_modulation.1", "swap"),
                      ("transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_v",
                       "txt_in.individual_token_refiner.blocks.0.self_attn.qkv", V),
                      ("transformer.time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", None)],
    },
}
KOHYA_STYLE = ("kohya", "onetrainer", "musubi", "native", "i2v", "lightning")  # lora_down/lora_up + .alpha


def rows_of(part, shape) -> tuple[slice, bool]:
    """(row slice of the model weight, swapped halves) of a FORMATS part."""
    if part is None:
        return slice(0, shape[0]), False
    if part == "swap":
        return slice(0, shape[0]), True
    unit = shape[1]
    start = part[0] * unit
    return slice(start, shape[0] if part[1] < 0 else start + part[1] * unit), False


def write_lora(path, family: str, fmt: str, shapes: dict, rank: int = 4, seed: int = 0, alpha: float = 8.0,
               entries=None, metadata=None) -> dict[str, torch.Tensor]:
    """Write a LoRA of ``fmt`` for ``family``'s small model (``shapes``: host key -> shape); returns the float64
    delta per host key at strength 1 (summed over the modules that share a fused weight)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    sd, want = {}, {}
    kohya = fmt in KOHYA_STYLE
    for name, path_, part in (entries or FORMATS[family][fmt]):
        key = f"diffusion_model.{path_}.weight"
        shape = shapes[key]
        rows, swap = rows_of(part, shape)
        n_out = rows.stop - rows.start
        down = torch.randn(rank, *shape[1:], generator=g) * 0.5
        up = torch.randn(n_out, rank, *[1] * (len(shape) - 2), generator=g) * 0.5
        if kohya:
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            sd[f"{name}.alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        else:
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
            scale = 1.0
        d = (up.reshape(n_out, rank).double() @ down.reshape(rank, -1).double()).reshape(n_out, *shape[1:]) * scale
        if swap:
            d = torch.cat([d[n_out // 2:], d[: n_out // 2]])
        full = want.setdefault(key, torch.zeros(shape, dtype=torch.float64))
        full[rows] += d
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return want
