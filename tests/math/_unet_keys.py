"""Synthetic host facts for pure LoRA tests (no comfy import).

``tiny_sd15()`` builds a small SD1.5-shaped LDM UNet description:
weight shapes (``diffusion_model.*``), a ComfyUI-style lora key map (what
``comfy.lora.model_lora_keys_unet`` would return, including its
``.processor.to_*`` quirk) and a diffusers->LDM map in the format of
``comfy.utils.unet_to_diffusers`` (re-derived here independently).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file


@dataclass
class TinyUnet:
    shapes: dict[str, tuple[int, ...]]
    key_map: dict[str, str]
    diffusers_to_ldm: dict[str, str]
    context_dim: int


_RES = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_ATT = ["proj_in", "proj_out", "norm"]
_TB = ["norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
       "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]


def tiny_sd15(ch: int = 8, mult=(1, 2, 4, 4), ctx: int = 12, temb: int = 16, attn_levels=(0, 1, 2)) -> TinyUnet:
    P = "diffusion_model."
    shapes: dict[str, tuple[int, ...]] = {}
    d2l: dict[str, str] = {}

    def add(name, shape, bias=True):
        shapes[P + name + ".weight"] = tuple(shape)
        if bias:
            shapes[P + name + ".bias"] = (shape[0],)

    def res(prefix, cin, cout, dprefix):
        add(prefix + ".in_layers.0", (cin,))
        add(prefix + ".in_layers.2", (cout, cin, 3, 3))
        add(prefix + ".emb_layers.1", (cout, temb))
        add(prefix + ".out_layers.0", (cout,))
        add(prefix + ".out_layers.3", (cout, cout, 3, 3))
        if cin != cout:
            add(prefix + ".skip_connection", (cout, cin, 1, 1))
        for l, d in _RES.items():
            for s in ("weight", "bias"):
                d2l[f"{dprefix}.{d}.{s}"] = f"{prefix}.{l}.{s}"

    def att(prefix, c, dprefix):
        add(prefix + ".norm", (c,))
        add(prefix + ".proj_in", (c, c, 1, 1))
        add(prefix + ".proj_out", (c, c, 1, 1))
        t = prefix + ".transformer_blocks.0."
        for n in ("norm1", "norm2", "norm3"):
            add(t + n, (c,))
        for a in ("attn1", "attn2"):
            add(t + a + ".to_q", (c, c), bias=False)
            kv_in = c if a == "attn1" else ctx
            add(t + a + ".to_k", (c, kv_in), bias=False)
            add(t + a + ".to_v", (c, kv_in), bias=False)
            add(t + a + ".to_out.0", (c, c))
        add(t + "ff.net.0.proj", (8 * c, c))
        add(t + "ff.net.2", (c, 4 * c))
        for b in _ATT:
            for s in ("weight", "bias"):
                d2l[f"{dprefix}.{b}.{s}"] = f"{prefix}.{b}.{s}"
        for b in _TB:
            d2l[f"{dprefix}.transformer_blocks.0.{b}.weight"] = f"{prefix}.transformer_blocks.0.{b}.weight"

    add("time_embed.0", (temb, ch))
    add("time_embed.2", (temb, temb))
    add("input_blocks.0.0", (ch, 4, 3, 3))
    skips = [ch]
    n, cur = 1, ch
    for x, m in enumerate(mult):
        for i in range(2):
            res(f"input_blocks.{n}.0", cur, ch * m, f"down_blocks.{x}.resnets.{i}")
            cur = ch * m
            if x in attn_levels:
                att(f"input_blocks.{n}.1", cur, f"down_blocks.{x}.attentions.{i}")
            skips.append(cur)
            n += 1
        if x < len(mult) - 1:
            add(f"input_blocks.{n}.0.op", (cur, cur, 3, 3))
            for s in ("weight", "bias"):
                d2l[f"down_blocks.{x}.downsamplers.0.conv.{s}"] = f"input_blocks.{n}.0.op.{s}"
            skips.append(cur)
            n += 1
    res("middle_block.0", cur, cur, "mid_block.resnets.0")
    att("middle_block.1", cur, "mid_block.attentions.0")
    res("middle_block.2", cur, cur, "mid_block.resnets.1")
    n = 0
    for xr, m in enumerate(reversed(mult)):
        x = len(mult) - 1 - xr
        for i in range(3):
            cin = cur + skips.pop()
            res(f"output_blocks.{n}.0", cin, ch * m, f"up_blocks.{xr}.resnets.{i}")
            cur = ch * m
            c = 1
            if x in attn_levels:
                att(f"output_blocks.{n}.1", cur, f"up_blocks.{xr}.attentions.{i}")
                c = 2
            if i == 2 and x > 0:
                add(f"output_blocks.{n}.{c}.conv", (cur, cur, 3, 3))
                for s in ("weight", "bias"):
                    d2l[f"up_blocks.{xr}.upsamplers.0.conv.{s}"] = f"output_blocks.{n}.{c}.conv.{s}"
            n += 1
    add("out.0", (ch,))
    add("out.2", (4, ch, 3, 3))

    # ComfyUI model_lora_keys_unet equivalent (SD/SDXL branch)
    km: dict[str, str] = {}
    for k in shapes:
        if k.endswith(".weight"):
            km["lora_unet_" + k[len(P):-len(".weight")].replace(".", "_")] = k
            km[k[:-len(".weight")]] = k
        else:
            km[k] = k
    for dk, lk in d2l.items():
        if dk.endswith(".weight"):
            hk = P + lk
            base = dk[:-len(".weight")]
            km["lora_unet_" + base.replace(".", "_")] = hk
            km["lycoris_" + base.replace(".", "_")] = hk
            for p in ("", "unet."):
                dl = p + base.replace(".to_", ".processor.to_")
                if dl.endswith(".to_out.0"):
                    dl = dl[:-2]
                km[dl] = hk
    return TinyUnet(shapes, km, d2l, ctx)


def ldm_to_diffusers(u: TinyUnet) -> dict[str, str]:
    """host weight key -> diffusers module path (no .weight)."""
    return {"diffusion_model." + l: d[:-len(".weight")] for d, l in u.diffusers_to_ldm.items()
            if d.endswith(".weight") and "diffusion_model." + l in u.shapes}


# ---------------------------------------------------------------- file writers

STYLES = {
    # name: (up suffix, down suffix, module-name function)
    "kohya_ldm": (".lora_up.weight", ".lora_down.weight", lambda ldm, dif: "lora_unet_" + ldm.replace(".", "_")),
    "kohya_diffusers": (".lora_up.weight", ".lora_down.weight", lambda ldm, dif: "lora_unet_" + dif.replace(".", "_")),
    "peft": (".lora_B.weight", ".lora_A.weight", lambda ldm, dif: "unet." + dif),
    "peft_base_model": (".lora_B.weight", ".lora_A.weight", lambda ldm, dif: "base_model.model." + dif),
    "diffusers_dot": (".lora.up.weight", ".lora.down.weight", lambda ldm, dif: dif),
    "diffusers_dot_unet": (".lora.up.weight", ".lora.down.weight", lambda ldm, dif: "unet." + dif),
    "lora_linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
                          lambda ldm, dif: "unet." + dif),
}


def write_lora(path: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], u: TinyUnet, style: str,
               alpha_in_tensor: bool = True, metadata: dict[str, str] | None = None,
               extra: dict[str, torch.Tensor] | None = None) -> str:
    """Write factors {host_key: (down, up, alpha)} in a given key style."""
    up_s, down_s, namer = STYLES[style]
    l2d = ldm_to_diffusers(u)
    sd: dict[str, torch.Tensor] = {}
    for hk, (down, up, alpha) in factors.items():
        ldm = hk[len("diffusion_model."):-len(".weight")]
        mod = namer(ldm, l2d[hk])
        sd[mod + up_s] = up.contiguous()
        sd[mod + down_s] = down.contiguous()
        if alpha_in_tensor and alpha is not None:
            sd[mod + ".alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, path, metadata=metadata)
    return path


def save(path: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


def node_deltas(entries, shapes, module_to_host, *, base_weight_fn=None, key_scale=None):
    """{host key: fp32 delta} of ``(entry, strength)`` pairs computed the way FewStep LoRA Fuse computes them:
    ``lora.merge.plan_merge`` groups them by model weight (one style adapter, ``key_scale`` as its block weights),
    ``lora.merge.merged_key_delta`` gives each weight's delta (linear mode: one GEMM)."""
    from fewstep.lora.merge import merged_key_delta, plan_merge
    from fewstep.lora.placement import place
    placed, hosts = place(entries, module_to_host)  # KeyMapper targets (row ranges wrapped), as the node does
    hosts = {**{m: h for m, h in module_to_host.items() if isinstance(h, str)}, **hosts}
    plan = plan_merge([], [placed], shapes, hosts, style_key_scale=key_scale)
    return {k: merged_key_delta(k, shape, acc, present, base_weight_fn=base_weight_fn)
            for k, (shape, acc, present) in plan.items()}
