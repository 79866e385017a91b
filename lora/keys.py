"""Map adapter module names onto host weight keys (and, for a split of a fused weight, onto some of its rows).

One algorithm: normalise every spelling of a module name to one canonical underscore form, and look it up in a table
built from host facts the node layer passes in (never imported from ``comfy`` here):

* ``host_key_map``: ComfyUI's ``comfy.lora.model_lora_keys_unet(model, {})`` result, lora-key-prefix -> host weight
  key, or a ``Target`` where the host maps a name onto rows of a fused weight (Flux / SD3 diffusers to_q / to_k /
  to_v of a qkv weight) or with its row halves swapped (diffusers' ``norm_out.linear``);
* ``diffusers_map``: ComfyUI's ``comfy.utils.unet_to_diffusers(unet_config)`` result for the UNet families,
  ``down_blocks.0.attentions.0.proj_in.weight`` -> ``input_blocks.1.1.proj_in.weight`` (no ``diffusion_model.``);
* ``shapes``: the host weights' shapes (the row ranges of the family's ``Alias`` splits).

The family's ``lora.layouts.KeyLayout`` holds what differs per family: the prefixes, the host key prefix, other
spellings of the model's modules (``aliases``: Wan's and HunyuanVideo's diffusers names, which the host does not map)
and the block names of the report.

Canonical form: strip the layout's known prefixes (UNet: ``lora_unet_``, sd-scripts OFT ``oft_unet_``,
``lycoris_``, ``unet.``, ``base_model.model.``, ``unet.base_model.model.``, ``model.diffusion_model.``,
``diffusion_model.``; DiTs also ``transformer.``, ``lora_transformer_``), drop old attention-processor segments
(``.processor``), replace ``.`` by ``_``, and append ``_0`` to a bare ``to_out``. Every spelling of a module the
host or the layout knows is entered, so kohya, PEFT (``unet.…attn1.to_q`` which ComfyUI drops), ``.lora.down/up``,
``lora_linear_layer``, attn-processor, musubi-tuner, OneTrainer, ai-toolkit and diffusers-named DiT files resolve.
Parameters that are not ``.weight`` (Wan's ``modulation``) are looked up under their own name.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from collections.abc import Iterable

import torch

from .families import UNET_KEYS
from .layouts import KeyLayout

LOG = logging.getLogger("fewstep")


@dataclass(frozen=True)
class Target:
    """Where a module's delta lands: host weight ``key``, rows ``start .. start+size`` of it (``size`` None = every
    row), with the two halves of those rows swapped when ``swap_halves`` (the module's rows are diffusers'
    (scale, shift) order, the weight's (shift, scale))."""

    key: str
    start: int = 0
    size: int | None = None
    swap_halves: bool = False

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.size is None and not self.swap_halves

    def rows(self, total: int) -> torch.Tensor | None:
        """Weight row of each of the module's rows (LongTensor), for a weight of ``total`` rows; None = identity."""
        if self.whole:
            return None
        size = total - self.start if self.size is None else self.size
        if self.start < 0 or size <= 0 or self.start + size > total or (self.swap_halves and size % 2):
            raise ValueError(f"rows {self.start}..{self.start + size} of '{self.key}' do not fit its {total} rows")
        idx = torch.arange(self.start, self.start + size)
        if self.swap_halves:
            idx = torch.cat([idx[size // 2:], idx[: size // 2]])
        return idx

    def describe(self) -> str:
        if self.whole:
            return self.key
        part = f"rows {self.start}..{'end' if self.size is None else self.start + self.size}"
        return f"{self.key} ({part}{', halves swapped' if self.swap_halves else ''})"


HostTarget = str | Target


def as_target(v: HostTarget) -> Target:
    return v if isinstance(v, Target) else Target(v)


def canonical(name: str, layout: KeyLayout = UNET_KEYS) -> str:
    """Canonical underscore form of a module name (any spelling, with or without ``.weight``) under ``layout``.

    >>> canonical("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out")
    'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0'
    """
    n = name
    if n.endswith(".weight"):
        n = n[: -len(".weight")]
    changed = True
    while changed:
        changed = False
        for p in layout.prefixes:
            if n.startswith(p):
                n = n[len(p):]
                changed = True
    n = n.replace(".", "_")
    n = n.replace("_processor_", "_")
    if n.endswith("_to_out"):
        n += "_0"
    return n


def _param(key: str) -> bool:
    """A host parameter a module name can target: a ``.weight`` or another non-bias parameter (Wan's
    ``modulation``)."""
    return not key.endswith(".bias")


class KeyMapper:
    """Lookup table canonical-name -> ``Target``.

    Args:
        host_key_map: lora-key -> host weight key or ``Target`` (ComfyUI ``model_lora_keys_unet``).
        diffusers_map: diffusers weight name -> model weight name without the host prefix (ComfyUI
            ``unet_to_diffusers``), or a ``Target`` with the full host key.
        layout: the family's key layout (prefixes stripped from module names, host key prefix, aliases).
        shapes: host key -> shape (needed for the layout's row-range aliases).
    """

    def __init__(self, host_key_map: dict[str, HostTarget], diffusers_map: dict[str, HostTarget] | None = None,
                 layout: KeyLayout = UNET_KEYS, shapes: dict[str, tuple] | None = None):
        self.layout = layout
        host_prefix = layout.host_prefix
        self.table: dict[str, Target] = {}
        self.ambiguous: dict[str, set[Target]] = {}
        host = {t.key for t in map(as_target, host_key_map.values()) if _param(t.key)}
        self.host_weights = host
        for hk in sorted(host):
            self._add(self.canonical(hk), Target(hk))
        for dk, v in (diffusers_map or {}).items():
            if not dk.endswith(".weight"):
                continue
            t = v if isinstance(v, Target) else Target(host_prefix + v)
            if host and t.key not in host:
                continue  # e.g. unet_to_diffusers lists a downsampler the model lacks
            self._add(self.canonical(dk), t)
        for lk, v in host_key_map.items():
            t = as_target(v)
            if _param(t.key):
                self._add(self.canonical(lk), t)
        self._add_aliases(sorted(host), shapes or {})
        if self.ambiguous:
            LOG.warning("fewstep key map: %d module names map to several host weights, e.g. %s",
                        len(self.ambiguous), next(iter(self.ambiguous)))

    def _add_aliases(self, host: list[str], shapes: dict[str, tuple]) -> None:
        for hk in host:
            c = self.canonical(hk)
            for a in self.layout.aliases:
                if not re.fullmatch(a.pattern, c):
                    continue
                name = re.sub(a.pattern, a.template, c)
                if a.rows is None:
                    self._add(name, Target(hk, swap_halves=a.swap_halves))
                    continue
                shape = shapes.get(hk)
                if shape is None or len(shape) < 2:
                    continue  # a split needs the weight's input width
                unit = int(shape[1])
                start, size = a.rows[0] * unit, (None if a.rows[1] < 0 else a.rows[1] * unit)
                if start + (size or 1) > int(shape[0]):
                    continue  # the model's fused weight is narrower than the split assumes
                self._add(name, Target(hk, start, size, a.swap_halves))

    def canonical(self, name: str) -> str:
        return canonical(name, self.layout)

    def _add(self, canon: str, target: Target) -> None:
        old = self.table.get(canon)
        if old is None:
            self.table[canon] = target
        elif old != target:
            self.ambiguous.setdefault(canon, {old}).add(target)

    def lookup_target(self, module: str) -> Target | None:
        """Target of ``module`` or None (also None when the name is ambiguous)."""
        c = self.canonical(module)
        if c in self.ambiguous:
            return None
        return self.table.get(c)

    def lookup(self, module: str) -> str | None:
        """Host weight key of ``module`` or None."""
        t = self.lookup_target(module)
        return None if t is None else t.key

    def match(self, modules: Iterable[str]) -> tuple[dict[str, Target], list[str]]:
        """Map module names; returns (matched module -> target, unmatched modules in input order)."""
        matched: dict[str, Target] = {}
        unmatched: list[str] = []
        for m in modules:
            t = self.lookup_target(m)
            if t is None:
                unmatched.append(m)
            else:
                matched[m] = t
        return matched, unmatched

    def split_variant_only(self, unmatched: list[str]) -> tuple[list[str], dict[str, list[str]]]:
        """(really unmatched modules, {what: modules} of modules only other variants of the family have)."""
        rest: list[str] = []
        variant: dict[str, list[str]] = {}
        for m in unmatched:
            c = self.canonical(m)
            hit = next((v for v in self.layout.optional if re.search(v.pattern, c)), None)
            if hit is None:
                rest.append(m)
            else:
                variant.setdefault(hit.what, []).append(m)
        return rest, variant


def group_unmatched(unmatched: Iterable[str], layout: KeyLayout = UNET_KEYS) -> dict[str, list[str]]:
    """Group unmatched module names by model block (for a loud, short report)."""
    groups: dict[str, list[str]] = {}
    for m in unmatched:
        hit = re.search(layout.block_re, canonical(m, layout))
        groups.setdefault(hit.group(1) if hit else "other", []).append(m)
    return groups


def require_all_matched(path: str, unmatched: list[str], limit: int = 5, layout: KeyLayout = UNET_KEYS,
                        hint: str = "") -> None:
    """Raise ``ValueError`` naming the file and the first unmatched keys when any module is unmatched."""
    if not unmatched:
        return
    groups = group_unmatched(unmatched, layout)
    by_block = ", ".join(f"{b}: {len(v)}" for b, v in sorted(groups.items()))
    raise ValueError(f"{path}: {len(unmatched)} module(s) match no weight of the loaded model "
                     f"(by block: {by_block}); first: {unmatched[:limit]}. "
                     + (hint or "Is the adapter made for another base model (e.g. SD1.5 vs SDXL)?"))
