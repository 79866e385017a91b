"""What the LoRA nodes take from the host and hand back to it.

* the loras folder (``lora_options``, ``resolve_lora``);
* ``HostFacts``: the model's family record (``lora.families``), its key map (with the row ranges and swapped halves
  the host maps diffusers names onto), block layout bound to the model's depth, weight shapes and base weights,
  passed to ``lora/`` as values;
* ``FusedDelta``: the lazy per-weight patch FewStep LoRA Fuse adds (computes its weight's whole delta when the host
  patches the weight);
* ``FuseRecord``: the settings of one fuse, stored on the patched model for Save Fused / Export LoRA.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
from comfy.weight_adapter.base import WeightAdapterBase

from ..lora import families, keys, layouts
from .common import checked, model_base

NONE = "none"
FUSE_KEY = "fewstep_fuse"  # model_options key: tuple of FuseRecord (one per FewStep LoRA Fuse in the chain)


# ---------------------------------------------------------------- loras folder

def lora_options() -> list[str]:
    import folder_paths
    return [NONE] + list(folder_paths.get_filename_list("loras"))


def resolve_lora(node: str, name: str) -> str:
    import folder_paths
    try:
        return folder_paths.get_full_path_or_raise("loras", name)
    except FileNotFoundError:
        raise ValueError(f"{node}: LoRA file {name!r} is not in the loras folder(s)") from None


# ---------------------------------------------------------------- host facts

def _diffusers_map(layout: layouts.KeyLayout, base_model) -> dict[str, str]:
    """The host's diffusers -> model weight-name table the family's key layout names (``KeyLayout.diffusers_map``)."""
    import comfy.utils
    if layout.diffusers_map == "unet":
        return comfy.utils.unet_to_diffusers(base_model.model_config.unet_config)
    return {}


def host_target(value):
    """A value of the host's LoRA key map as a ``lora.keys`` target: a weight key, or ``(key, (dim, start, size))``
    (rows of a fused weight) / ``(key, offset or None, comfy.utils.swap_scale_shift)`` as a ``Target``; None for a
    mapping this code cannot reproduce exactly (another axis or function), which then stays unmatched."""
    import comfy.utils
    if isinstance(value, str):
        return value
    key, offset, fn = (tuple(value) + (None, None))[:3]
    if (fn is not None and fn is not comfy.utils.swap_scale_shift) or (offset is not None and offset[0] != 0):
        return None
    start, size = (int(offset[1]), int(offset[2])) if offset is not None else (0, None)
    return keys.Target(key, start, size, fn is not None)


class HostFacts:
    """What lora/ needs from the host model: family, key mapper, block layout, weight shapes, base weights.

    Raises ValueError naming the node and the family for a model whose family LoRA fusing does not cover."""

    def __init__(self, node: str, model):
        import comfy.lora
        base = model.model
        self.model = model
        self.base = model_base(model)
        self.family = checked(node, families.family, self.base)
        self.sd = base.state_dict()
        prefix = self.family.keys.host_prefix
        self.shapes = {k: tuple(v.shape) for k, v in self.sd.items() if k.startswith(prefix)}
        key_map = {k: t for k, v in comfy.lora.model_lora_keys_unet(base, {}).items()
                   if (t := host_target(v)) is not None}
        self.mapper = keys.KeyMapper(key_map, _diffusers_map(self.family.keys, base), self.family.keys, self.shapes)
        self.blocks = self.family.blocks.bind(keys.canonical(k) for k in self.shapes)

    def base_weight(self, key: str) -> torch.Tensor:
        """Unpatched weight: the shared backup when some clone currently has the model patched."""
        bk = self.model.backup.get(key)
        w = bk.weight if bk is not None else self.sd[key]
        return w.float()


# ---------------------------------------------------------------- the lazy patch

class PatchProgress:
    """The host's progress bar while the host patches one fuse's weights (when it loads the model: at sampling,
    in Save Fused): one tick per weight, on the node that is running. A new bar starts with each full pass."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = max(1, total), 0, None

    def tick(self) -> None:
        import comfy.utils
        if self.bar is None or self.done >= self.total:
            self.bar, self.done = comfy.utils.ProgressBar(self.total), 0
        self.done += 1
        self.bar.update_absolute(self.done)


class FusedDelta(WeightAdapterBase):
    """A host weight patch that computes its weight's merged fp32 delta only when the host patches the weight."""

    name = "fewstep_fused"

    def __init__(self, node: str, compute, progress: PatchProgress | None = None, limit: float | None = None,
                 files: tuple[str, ...] = ()):
        self.node, self.compute, self.progress = node, compute, progress
        self.limit, self.files = limit, files  # largest magnitude a patched weight may take; adapter file names
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []

    def check_result(self, weight: torch.Tensor, key: str) -> torch.Tensor:
        """ValueError (naming the node, weight and files) when the patched weight is not finite or beyond
        ``self.limit``: an absurd alpha or strength would otherwise sample into a black image."""
        if not weight.numel():
            return weight
        lo, hi = (float(v) for v in torch.aminmax(weight.detach()))  # one pass, no copy; NaN propagates
        amax = math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
        limit = self.limit if self.limit is not None else math.inf
        if not amax <= limit:  # NaN fails too
            what = "non-finite" if not math.isfinite(amax) else f"as large as {amax:.3g} (at most {limit:.6g})"
            raise ValueError(f"{self.node}: fusing {', '.join(self.files) or 'the adapters'} makes weight '{key}' "
                             f"{what}; an adapter's alpha or strength is far too large (or its file is damaged)")
        return weight

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if self.progress is not None:
            self.progress.tick()
        probe = weight.new_zeros(())
        # The usual case: the host hands us its fp32 working copy; accumulate straight into it.
        in_place = (strength == 1.0 and function(probe) is probe and weight.dtype == torch.float32
                    and weight.is_contiguous())
        try:
            delta = self.compute(device=weight.device, out=weight) if in_place else self.compute(device=weight.device)
        except ValueError as e:
            raise ValueError(f"{self.node}: {e}") from None
        except (RuntimeError, IndexError, TypeError) as e:
            if isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
                raise  # the host's memory handling deals with it
            raise ValueError(f"{self.node}: computing the fused delta of '{key}' from "
                             f"{', '.join(self.files) or 'the adapters'} failed: {e}") from None
        if not in_place and delta is not None and strength != 0.0:
            weight += function((strength * delta).to(weight.dtype))
        return self.check_result(weight, key)


WEIGHT_LIMIT = float(torch.finfo(torch.float16).max)
"""Largest magnitude a fused weight may take: fp16's largest finite value. These models ship and run in fp16 (their
weights are of order 1), so a weight beyond it is an absurd alpha or strength, or a damaged file, in any dtype."""


def range_limit(weight: torch.Tensor) -> float | None:
    """Largest magnitude a patched weight stored as ``weight`` may take (``WEIGHT_LIMIT`` for IEEE half/bfloat/float
    weights; None, i.e. finite only, for others such as fp8 weights the host rescales on load)."""
    return WEIGHT_LIMIT if weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else None


def adapter_files(*item_lists) -> tuple[str, ...]:
    """File names of the adapter entries in lists of (entry, strength) items (for error messages)."""
    return tuple(sorted({os.path.basename(e.file) for items in item_lists for e, _ in items}))


def plain_fuse_patch(p) -> bool:
    """A FewStep LoRA Fuse patch as the fuse adds it (strengths 1, no offset or function): its delta is exact."""
    strength, adapter, strength_model, offset, function = p[:5]
    return (isinstance(adapter, FusedDelta) and strength == 1.0 and strength_model == 1.0 and offset is None
            and function is None)


# ---------------------------------------------------------------- the fuse record

@dataclass(frozen=True)
class FusedAdapter:
    """One adapter of a fuse: its role ("accel" or "style"), file name (never a local path), strength, number of
    text-encoder modules in the file, and its own block weights ("" = the fuse node's)."""

    role: str
    name: str
    strength: float
    te_modules: int
    block_weights: str


@dataclass(frozen=True)
class FuseRecord:
    """The settings of one FewStep LoRA Fuse, as stored on the patched model and in saved files' metadata."""

    adapters: tuple[FusedAdapter, ...]
    merge_mode: str
    density: float
    drop_p: float
    seed: int
    block_weights: str
    lines_alpha: float
    lines_beta: float
    on_unmatched: str
    base: str

    def to_json(self) -> dict:
        """The record as plain JSON values (the ``fewstep.fuse`` metadata of saved files)."""
        d = dataclasses.asdict(self)
        d["adapters"] = [dict(a) for a in d["adapters"]]
        return d


def fuse_records(model) -> list[FuseRecord]:
    """The fuse records of every FewStep LoRA Fuse that patched ``model``, in chain order."""
    return list(model.model_options.get(FUSE_KEY, ()))


# ---------------------------------------------------------------- the model's file

FILE_INPUTS = ("unet_name", "ckpt_name", "model_name")


def model_file_from_prompt(prompt, unique_id, input_name: str = "model", limit: int = 64) -> str:
    """The file name the MODEL input of node ``unique_id`` was loaded from, following the workflow's links upstream
    through nodes that pass a model on (LoRA loaders, model sampling, another fuse) to a loader with ``unet_name`` /
    ``ckpt_name``; "" when the workflow does not tell."""
    if not isinstance(prompt, dict) or unique_id is None:
        return ""
    node = prompt.get(str(unique_id))
    for _ in range(limit):
        if not isinstance(node, dict):
            return ""
        inputs = node.get("inputs") or {}
        for name in FILE_INPUTS:
            if isinstance(inputs.get(name), str):
                return inputs[name]
        link = inputs.get(input_name)
        if not (isinstance(link, list) and link):
            return ""
        node = prompt.get(str(link[0]))
        input_name = "model"
    return ""
