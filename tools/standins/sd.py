"""SD1.5 / SDXL stand-ins: real-architecture checkpoints and LoRA files with seeded random weights.

* ``fewstep-standin-sd15.safetensors`` / ``fewstep-standin-sdxl.safetensors``: fp16 checkpoints in the
  original LDM layout (UNet, CLIP text encoder(s), VAE) that the host's ``CheckpointLoaderSimple``
  detects as SD1.5 / SDXL.  Every tensor is filled explicitly (the host's layers leave weights
  uninitialised) and scaled so every stage stays finite and bounded: norms are identity, biases
  zero, linear/conv weights ~ N(0, 1/fan_in), and the two output convolutions are tuned so the UNet
  predicts eps of order 1 and the VAE decodes into [-1, 1] most of the time.
* LoRA files in the key formats users meet (see ``LORA_FILES``), laid out like the published
  LCM-LoRA (whole UNet, rank 64) and like a typical style LoRA (attention only, small rank).

Written to ``<cache>/{checkpoints,loras}`` by ``tools.standins.ensure``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tools import hostenv

from .common import SEED, gen, save

log = logging.getLogger("fewstep")

KINDS = ("sd15", "sdxl")

UNET_CONFIGS = {
    # The host's own SD1.5 / SDXL UNet configurations (comfy/model_detection.py).
    "sd15": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_temporal_attention=False, use_temporal_resblock=False),
    "sdxl": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_temporal_attention=False, use_temporal_resblock=False),
}

# A tiny UNet with the SD1.5 layout (same key structure, 2 levels) for fast in-process unit tests.
TINY_UNET_CONFIG = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                        adm_in_channels=None, in_channels=4, model_channels=32, num_res_blocks=[1, 1],
                        transformer_depth=[1, 1, 1, 1], channel_mult=[1, 2], transformer_depth_middle=1,
                        use_linear_in_transformer=False, context_dim=64, num_heads=4,
                        transformer_depth_output=[1, 1, 1, 1], use_temporal_attention=False, use_temporal_resblock=False)

VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}

# Output gains: GroupNorm -> SiLU -> conv gives std ~0.6*gain for unit-variance inputs.
OUTPUT_GAIN = {"model.diffusion_model.out.2.weight": 1.6, "first_stage_model.decoder.conv_out.weight": 0.8}

# name -> (base, format, layout, rank, alpha)
LORA_FILES = {
    "lcm-lora-{base}-standin.safetensors": ("kohya_diffusers", "full", 64, 8.0),
    "style-{base}-kohya.safetensors": ("kohya_diffusers", "attn", 8, 4.0),
    "style-{base}-kohya-ldm.safetensors": ("kohya_ldm", "attn", 8, 4.0),
    "style-{base}-peft.safetensors": ("peft", "attn", 8, 4.0),
    "style-{base}-diffusers-lora.safetensors": ("diffusers_lora", "attn", 8, 4.0),
    "style-{base}-loha.safetensors": ("loha", "attn", 4, 4.0),
    "style-{base}-lokr.safetensors": ("lokr", "attn", 4, 4.0),
    "style-{base}-dora.safetensors": ("dora", "attn", 8, 4.0),
}
BASE_TAG = {"sd15": "sd15", "sdxl": "sdxl"}


def _gen(name: str) -> torch.Generator:
    return gen(name)


def fill(name: str, like: torch.Tensor, dtype=torch.float16) -> torch.Tensor:
    """The seeded value of one checkpoint tensor, chosen from its name and shape alone."""
    shape = tuple(like.shape)
    if not like.dtype.is_floating_point:  # position_ids
        return torch.arange(shape[-1], dtype=like.dtype).expand(shape).clone()
    if name.endswith("logit_scale"):
        return torch.full(shape, 4.6052, dtype=dtype)
    if name.endswith("bias") or name.endswith("in_proj_bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) <= 1:  # norm scales
        return torch.ones(shape, dtype=dtype)
    if "embedding" in name and "positional" not in name and len(shape) == 2 and "token" in name:
        return (torch.randn(shape, generator=_gen(name)) * 0.5).to(dtype)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    if "positional_embedding" in name or "position_embedding" in name:
        fan_in = 4  # additive, O(0.5)
    if "text_projection" in name:
        fan_in = shape[0]
    gain = OUTPUT_GAIN.get(name, 1.0)
    return (torch.randn(shape, generator=_gen(name)) * (gain / fan_in ** 0.5)).to(dtype)


def _meta_state_dict(kind: str) -> dict[str, torch.Tensor]:
    """Checkpoint keys and shapes (meta tensors), produced by the host's own classes and save path."""
    hostenv.import_host()
    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = UNET_CONFIGS[kind]
    model_config = (sm.SD15 if kind == "sd15" else sm.SDXL)(dict(cfg))
    with torch.device("meta"):
        unet = UNetModel(**cfg, dtype=torch.float16, operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SD1ClipModel(device="meta") if kind == "sd15" else comfy.sdxl_clip.SDXLClipModel(device="meta")
        vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update(model_config.process_clip_state_dict_for_saving(clip.state_dict()))
    sd.update(model_config.process_vae_state_dict_for_saving(vae.state_dict()))
    return sd


def build_checkpoint(kind: str, path: Path) -> None:
    meta = _meta_state_dict(kind)
    log.info("writing stand-in %s checkpoint (%d tensors) to %s", kind, len(meta), path)
    save({k: fill(k, v) for k, v in meta.items()}, path, {"fewstep_standin": kind, "seed": str(SEED)})


# ---------------------------------------------------------------- LoRA files

def unet_lora_targets(kind: str, layout: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """diffusers module name -> (LDM module name, weight shape) for the modules a LoRA of `layout` touches."""
    hostenv.import_host()
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = UNET_CONFIGS[kind]
    with torch.device("meta"):
        unet = UNetModel(**cfg, dtype=torch.float16, operations=comfy.ops.disable_weight_init)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    out = {}
    for dkey, lkey in comfy.utils.unet_to_diffusers(cfg).items():
        if not dkey.endswith(".weight") or lkey not in shapes or len(shapes[lkey]) < 2:
            continue
        dmod = dkey[: -len(".weight")]
        is_attn = any(p in dmod for p in (".attn1.to_", ".attn2.to_"))
        if layout == "attn" and not is_attn:
            continue
        if layout == "full" and dmod in ("conv_in", "conv_out"):
            continue
        out[dmod] = (lkey[: -len(".weight")], shapes[lkey])
    return dict(sorted(out.items()))


def _factors(name: str, shape, rank: int, scale: float):
    """Seeded (down, up) with |up @ down| * scale about 0.1 of the base weight's size."""
    out_f, fan_in = shape[0], 1
    for s in shape[1:]:
        fan_in *= s
    g = _gen("lora:" + name)
    down = torch.randn((rank, *shape[1:]), generator=g) / fan_in ** 0.5
    up_shape = (out_f, rank) + ((1, 1) if len(shape) == 4 else ())
    up = torch.randn(up_shape, generator=g) * (0.1 / (rank ** 0.5 * scale))
    return down, up


def build_lora(kind: str, fmt: str, layout: str, rank: int, alpha: float, path: Path) -> None:
    from safetensors.torch import save_file
    targets = unet_lora_targets(kind, layout)
    sd: dict[str, torch.Tensor] = {}
    scale = alpha / rank
    for dmod, (lmod, shape) in targets.items():
        down, up = _factors(f"{kind}:{layout}:{rank}:{dmod}", shape, rank, scale)
        kohya = "lora_unet_" + (dmod if fmt != "kohya_ldm" else lmod).replace(".", "_")
        a = torch.tensor(alpha)
        if fmt in ("kohya_diffusers", "kohya_ldm", "dora"):
            sd[kohya + ".lora_down.weight"], sd[kohya + ".lora_up.weight"], sd[kohya + ".alpha"] = down, up, a
            if fmt == "dora":
                base = fill("model.diffusion_model." + lmod + ".weight", torch.empty(shape)).float()
                sd[kohya + ".dora_scale"] = base.flatten(1).norm(dim=1, keepdim=True).reshape(shape[0], *[1] * (len(shape) - 1)) * 1.05
        elif fmt == "peft":
            sd[f"unet.{dmod}.lora_A.weight"], sd[f"unet.{dmod}.lora_B.weight"] = down, up
        elif fmt == "diffusers_lora":
            sd[f"unet.{dmod}.lora.down.weight"], sd[f"unet.{dmod}.lora.up.weight"] = down, up
        elif fmt == "loha":
            g = _gen("loha:" + dmod)
            n = shape[0]
            m = int(torch.tensor(shape[1:]).prod())
            sd[kohya + ".hada_w1_a"] = torch.randn(n, rank, generator=g) * 0.05
            sd[kohya + ".hada_w1_b"] = torch.randn(rank, m, generator=g) / m ** 0.5
            sd[kohya + ".hada_w2_a"] = torch.randn(n, rank, generator=g) * 0.5
            sd[kohya + ".hada_w2_b"] = torch.randn(rank, m, generator=g) / m ** 0.5
            sd[kohya + ".alpha"] = a
        elif fmt == "lokr":
            g = _gen("lokr:" + dmod)
            f = 4 if shape[0] % 4 == 0 and shape[1] % 4 == 0 else 1
            m = int(torch.tensor(shape[1:]).prod())
            sd[kohya + ".lokr_w1"] = torch.randn(f, f, generator=g) * 0.3
            sd[kohya + ".lokr_w2_a"] = torch.randn(shape[0] // f, rank, generator=g) * 0.05
            sd[kohya + ".lokr_w2_b"] = torch.randn(rank, m // f, generator=g) / (m // f) ** 0.5
            sd[kohya + ".alpha"] = a
        else:
            raise ValueError(f"unknown stand-in LoRA format {fmt!r}")
    if fmt == "peft":
        sd = {k: v for k, v in sd.items()}
        meta = {"lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": alpha})}
    else:
        meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    meta["fewstep_standin"] = f"{kind}:{fmt}:{layout}"
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path), metadata=meta)


def ensure_kind(kind: str, root: Path) -> None:
    """Build the checkpoint and LoRA files of one SD kind under `root` (those that are missing)."""
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "loras").mkdir(parents=True, exist_ok=True)
    ckpt = root / "checkpoints" / checkpoint_name(kind)
    if not ckpt.exists():
        build_checkpoint(kind, ckpt)
    for pattern, (fmt, layout, rank, alpha) in LORA_FILES.items():
        p = root / "loras" / pattern.format(base=BASE_TAG[kind])
        if not p.exists():
            build_lora(kind, fmt, layout, rank, alpha, p)


def checkpoint_name(kind: str) -> str:
    return f"fewstep-standin-{kind}.safetensors"
