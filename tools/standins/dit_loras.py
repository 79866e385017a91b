"""DiT LoRA stand-ins: files whose key names and structure mirror released LoRAs of the flow families.

A family module lists its files (``LoraFile``) and says which modules each one covers under which names
(``lora_layout(lf, host_sd)``); this module writes them.  Two kinds of names are used:

* the release's own module names (Wan, BFL-Flux, Qwen-Image, Tencent HunyuanVideo, MMDiT): taken from the host's
  model on the meta device (``flow.host_model_state_dict``), renamed where the release names differ;
* diffusers module names (``transformer.*`` files of diffusers / PEFT / ai-toolkit / OneTrainer): taken from
  diffusers' own transformer class of the family, built on the meta device at the stand-in's size
  (``diffusers_linears``), so every name is one diffusers really has.

Suffix styles: ``"kohya"`` writes ``<base>.lora_down.weight`` / ``.lora_up.weight`` (and ``.alpha`` when the
file has one), ``"peft"`` writes ``<base>.lora_A.weight`` / ``.lora_B.weight``.  ``extras`` are whole-tensor
differences the release also carries (``.diff`` weights, ``.diff_b`` biases, Wan's ``.diff_m`` modulations).

Values: down ~ N(0, 1/fan_in), up scaled so alpha/rank * up @ down is about 0.1 of the base weight; differences
are small (1 % of a unit norm scale).  Acceleration-shaped files keep the released rank and coverage; style files
use small ranks.  ``core_drops`` records, per file, the keys ComfyUI 0.3.75's own LoRA loader leaves unloaded
(``comfy.lora.model_lora_keys_unet`` + ``load_lora``), asserted by tests/host/test_standins_flow.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import SEED, gen, save


@dataclass(frozen=True)
class LoraFile:
    name: str                       # file name in loras/
    role: str                       # "acceleration" or "style"
    layout: str                     # which modules under which names: read by the family's lora_layout()
    suffix: str                     # "kohya" (lora_down/lora_up[/alpha]) or "peft" (lora_A/lora_B)
    rank: int
    alpha: float | None             # None: the file has no alpha keys (scale 1)
    target: str                     # the family's model role the file fits ("model", "t2v", "high_noise", ...)
    mirrors: str                    # the public release / trainer whose layout the file has
    core_drops: tuple = ()          # regexes of the keys core 0.3.75 leaves unloaded ((".*",) = all of them)
    # how tests check the names: the name of a diffusers.loaders.lora_conversion_utils converter that reads this
    # layout (its output must name Linear modules of diffusers' transformer); "diffusers" (the base names are
    # Linear modules of diffusers' transformer); "core" (core's own mapping of the trainer's format loads it all)
    reference: str = "core"
    dtype: torch.dtype = torch.bfloat16


def native_linears(host: dict, include: str, prefix: str = "", rename=None, underscore: bool = False) -> dict:
    """Base name -> weight shape of the host model's 2-D weights whose module name matches `include`
    (`rename`: host key -> released key, applied to the whole ``<module>.weight`` key)."""
    out = {}
    for k, v in host.items():
        if not k.endswith(".weight") or v.ndim != 2:
            continue
        base = k[: -len(".weight")]
        if re.fullmatch(include, base):
            name = rename(k)[: -len(".weight")] if rename else base
            out[prefix + (name.replace(".", "_") if underscore else name)] = tuple(v.shape)
    return out


def diffusers_linears(model, include: str, prefix: str = "transformer.", underscore: bool = False) -> dict:
    """Base name -> weight shape of the Linear modules of a diffusers transformer matching `include`."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and re.fullmatch(include, name):
            out[prefix + (name.replace(".", "_") if underscore else name)] = tuple(mod.weight.shape)
    return out


def _factors(key: str, shape, rank: int, scale: float, salt: str):
    out_f, fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
    g = gen("lora:" + key, salt)
    down = torch.randn((rank, fan_in), generator=g) / fan_in ** 0.5
    up = torch.randn((out_f, rank), generator=g) * (0.1 / (rank ** 0.5 * scale))
    return down, up


def _diff(key: str, shape, salt: str, zero: bool) -> torch.Tensor:
    if zero:
        return torch.zeros(shape)
    g = gen("diff:" + key, salt)
    if len(shape) >= 2 and key.endswith(".diff"):  # a whole weight difference: 0.1 of an N(0, 1/fan_in) weight
        return torch.randn(shape, generator=g) * (0.1 / int(torch.tensor(shape[1:]).prod()) ** 0.5)
    return torch.randn(shape, generator=g) * 0.01


def build(fam, lf: LoraFile, path: Path) -> None:
    """Write `lf` for the family `fam` (its module's lora_layout gives the modules and extras)."""
    from . import flow
    layout_fn = fam.lora_layout
    host = flow.host_model_state_dict(fam.models[lf.target].config)
    modules, extras, zeros = layout_fn(lf, host)
    if not modules:
        raise ValueError(f"{lf.name}: layout {lf.layout!r} covers no module")
    scale = (lf.alpha / lf.rank) if lf.alpha else 1.0
    sd: dict[str, torch.Tensor] = {}
    for base, shape in modules.items():
        down, up = _factors(base, shape, lf.rank, scale, lf.name)
        if lf.suffix == "kohya":
            sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"] = down, up
            if lf.alpha is not None:
                sd[base + ".alpha"] = torch.tensor(float(lf.alpha))
        elif lf.suffix == "peft":
            sd[base + ".lora_A.weight"], sd[base + ".lora_B.weight"] = down, up
        else:
            raise ValueError(f"{lf.name}: unknown suffix style {lf.suffix!r}")
    for key, shape in extras.items():
        sd[key] = _diff(key, shape, lf.name, key in zeros)
    meta = {"fewstep_standin": f"{fam.key}:{lf.layout}", "mirrors": lf.mirrors, "seed": str(SEED)}
    if lf.suffix == "kohya":
        meta.update(ss_network_dim=str(lf.rank), ss_network_alpha=str(lf.alpha if lf.alpha is not None else lf.rank))
    else:
        meta["lora_adapter_metadata"] = json.dumps({"r": lf.rank, "lora_alpha": lf.alpha or lf.rank})
    save({k: v.to(lf.dtype) for k, v in sd.items()}, path, meta)
