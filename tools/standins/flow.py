"""Flow-matching / DiT stand-ins: what a family declares and how its files are built.

A family module (``sd3.py``, ``flux.py``, ...) declares one ``Family``: its diffusion-model files (``ModelFile``:
the config the host's detection reads back, the released file's key names), its VAE (``VaeFile``: the keys the
host's VAE detection reads), the core nodes users put around it, and its LoRA files (``dit_loras.LoraFile``).

Keys and shapes always come from the host's own classes, built on the meta device:

* diffusion model: ``comfy.model_detection.model_config_from_unet_config(config).get_model()`` -- the same
  constructor ``UNETLoader`` runs after detection -- so the file loads with no missing or unexpected key;
* VAE: ``comfy.sd.VAE(sd=<the keys detection reads>)`` -- the same branch ``VAELoader`` takes.

Weights are seeded from the tensor name and a per-file salt (two files with one layout, like the Wan 2.2
experts, differ) and scaled so every stage stays finite: biases zero, norm scales one, linear/conv weights
N(0, 1/fan_in).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch

from tools import hostenv

from .common import SEED, gen, save

log = logging.getLogger("fewstep")

FOLDERS = ("diffusion_models", "vae", "loras")


@dataclass(frozen=True)
class ModelFile:
    name: str                      # file name in diffusion_models/
    config: dict                   # what comfy.model_detection.detect_unet_config reads back from the file
    mirrors: str                   # the public release whose key layout the file has
    dtype: torch.dtype = torch.bfloat16
    prefix: str = ""               # key prefix of the released single file
    release_key: Callable[[str], str] | None = None   # host key -> released key, where the release names differ


@dataclass(frozen=True)
class VaeFile:
    name: str                      # file name in vae/
    detect: dict                   # key -> shape: the keys comfy.sd.VAE's detection reads
    mirrors: str
    dtype: torch.dtype = torch.bfloat16
    out_gain: float = 0.8          # decoder output conv: decodes into [-1, 1] most of the time


@dataclass(frozen=True)
class Family:
    key: str                       # the model-family string of the node layer ("sd3", "flux", ...)
    host_class: str                # comfy.model_base class the host loads it as
    model_sampling: str            # comfy.model_sampling base class of model.model_sampling after loading
    sampling_defaults: dict        # shift / multiplier the host sets from supported_models
    sampling_node: tuple | None    # (core node users put after the loader, its usual inputs) or None
    models: dict                   # role -> ModelFile
    vae: VaeFile
    latent: tuple                  # (core empty-latent node, tiny inputs)
    latent_shape: tuple            # the shape that node gives for those inputs
    notes: str = ""
    loras: tuple = field(default=())   # dit_loras.LoraFile entries
    # (LoraFile, host state dict) -> (base name -> 2-D shape, extra key -> shape, the extra keys that are zeros)
    lora_layout: Callable | None = None
    # role -> diffusers' transformer class of the family at the stand-in's size, on the meta device
    diffusers_model: Callable | None = None


# ---------------------------------------------------------------- keys and shapes from the host's classes

def host_model_state_dict(config: dict) -> dict[str, torch.Tensor]:
    """Host-named keys -> meta tensors of the diffusion model the host builds for `config`."""
    hostenv.import_host()
    import comfy.model_detection as md
    model_config = md.model_config_from_unet_config(dict(config))
    if model_config is None:
        raise ValueError(f"the host matches no model to the stand-in config {config}")
    with torch.device("meta"):
        model = model_config.get_model({})
    return dict(model.diffusion_model.state_dict())


def release_state_dict(mf: ModelFile) -> dict[str, torch.Tensor]:
    """Released-file keys -> meta tensors; checked to map back onto the host's keys one to one."""
    hostenv.import_host()
    import comfy.model_detection as md
    host = host_model_state_dict(mf.config)
    rename = mf.release_key or (lambda k: k)
    out = {mf.prefix + rename(k): v for k, v in host.items()}
    if len(out) != len(host):
        raise AssertionError(f"{mf.name}: two host keys share one released name")
    model_config = md.model_config_from_unet_config(dict(mf.config))
    back = model_config.process_unet_state_dict({k[len(mf.prefix):]: v for k, v in out.items()})
    if set(back) != set(host):
        raise AssertionError(f"{mf.name}: released names do not map back onto the host's keys: "
                             f"{sorted(set(back) ^ set(host))[:8]}")
    return out


def host_vae_state_dict(detect: dict) -> dict[str, torch.Tensor]:
    """Keys -> meta tensors of the VAE the host builds from a file holding the `detect` keys."""
    hostenv.import_host()
    import comfy.sd
    root = logging.getLogger()
    was, root.disabled = root.disabled, True   # "Missing VAE keys" is expected here: only the detect keys are given
    try:
        with torch.device("meta"):
            vae = comfy.sd.VAE(sd={k: torch.empty(s) for k, s in detect.items()})
    finally:
        root.disabled = was
    return dict(vae.first_stage_model.state_dict())


# ---------------------------------------------------------------- weights

def fill(name: str, like: torch.Tensor, salt: str, dtype: torch.dtype, gains: dict | None = None) -> torch.Tensor:
    """The seeded value of one tensor, from its name, shape and the file's salt."""
    shape = tuple(like.shape)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) <= 1 or name.endswith((".gamma", ".scale")):  # norm scales (Wan VAE gammas are (C,1,1,1))
        return torch.ones(shape, dtype=dtype)
    if name.endswith("modulation"):  # Wan's learned (1, n, dim) modulation offsets: randn / sqrt(dim) as trained
        std = shape[-1] ** -0.5
    elif name.endswith("pos_embed"):  # SD3's additive position table (sin-cos in the release): O(0.5)
        std = 0.5
    else:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        std = (gains or {}).get(name, 1.0) / fan_in ** 0.5
    # one pass in fp32 (normal_ draws the same stream as randn), one rounding to the file's dtype
    return torch.empty(shape).normal_(0.0, std, generator=gen(name, salt)).to(dtype)


def build_model(mf: ModelFile, path: Path) -> None:
    meta = release_state_dict(mf)
    log.info("writing stand-in diffusion model %s (%d tensors)", path.name, len(meta))
    save({k: fill(k, v, mf.name, mf.dtype) for k, v in meta.items()}, path,
         {"fewstep_standin": mf.name, "mirrors": mf.mirrors, "seed": str(SEED)})


def build_vae(vf: VaeFile, path: Path) -> None:
    meta = host_vae_state_dict(vf.detect)
    out_conv = [k for k in meta if k.startswith("decoder.") and "conv_out" in k and k.endswith("weight")]
    out_conv += [k for k in meta if k.startswith("decoder.head.") and k.endswith("weight") and meta[k].ndim == 5]
    gains = {k: vf.out_gain for k in out_conv}
    log.info("writing stand-in VAE %s (%d tensors)", path.name, len(meta))
    save({k: fill(k, v, vf.name, vf.dtype, gains) for k, v in meta.items()}, path,
         {"fewstep_standin": vf.name, "mirrors": vf.mirrors, "seed": str(SEED)})


def ensure_family(fam: Family, root: Path) -> None:
    """Build the missing files of one family under root/{diffusion_models,vae,loras}."""
    from . import dit_loras
    for sub in FOLDERS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for mf in fam.models.values():
        p = root / "diffusion_models" / mf.name
        if not p.exists():
            build_model(mf, p)
    p = root / "vae" / fam.vae.name
    if not p.exists():
        build_vae(fam.vae, p)
    for lf in fam.loras:
        p = root / "loras" / lf.name
        if not p.exists():
            dit_loras.build(fam, lf, p)
