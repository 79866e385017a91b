"""Adapter kinds, one module each, and the one list that registers them (cf. ComfyUI ``comfy/weight_adapter/`` and
LyCORIS ``lycoris/functional/``).

Adding a kind: write ``lora/adapters/<kind>.py`` with its entry dataclass (``make_delta`` and the class facts in
``base.ModuleEntry``) and a ``KIND = AdapterKind(name, suffixes, parse)``, then add ``KIND`` to ``ADAPTERS``.
``lora.formats`` builds its tensor-name table from the list; ``lora.fuse`` computes any entry through
``entry.delta`` (``entry.factors`` for the one-GEMM kinds). Order in the list is parse order: the first kind that
claims a module's weight owns it, and a second claim on the same target is an error.
"""
from __future__ import annotations

import logging

from . import diff, glora, ia3, loha, lokr, lora, norm, oft
from .base import COMMON_ROLES, COMMON_SUFFIXES, DORA_NORM_PEFT, AdapterKind, ModuleEntry, ModuleTensors, Suffix, src
from .diff import BiasDiffModule, DiffModule
from .glora import GloraModule
from .ia3 import Ia3Module
from .loha import LohaModule
from .lokr import LokrModule
from .lora import LoraModule
from .oft import OftModule

__all__ = ["ADAPTERS", "COMMON_ROLES", "COMMON_SUFFIXES", "DORA_NORM_PEFT", "AdapterKind", "BiasDiffModule",
           "DiffModule", "Entry", "GloraModule", "Ia3Module", "LohaModule", "LokrModule", "LoraModule", "ModuleEntry",
           "ModuleTensors", "OftModule", "Suffix", "parse_module"]

LOG = logging.getLogger("fewstep")

ADAPTERS: list[AdapterKind] = [lora.KIND, loha.KIND, lokr.KIND, glora.KIND, oft.KIND, ia3.KIND, diff.KIND, norm.KIND]

Entry = ModuleEntry
"""Any adapter entry (the type every kind's entry derives from)."""


def parse_module(t: ModuleTensors) -> list[Entry]:
    """The entries of one module's tensors: each registered kind parses its part; a weight (or a bias) claimed
    twice, DoRA on a kind that cannot carry it, and tensors no entry used are errors naming the file and tensor."""
    out: list[Entry] = []
    used = set(COMMON_ROLES)
    for kind in ADAPTERS:
        entries = kind.parse(t)
        for e in entries:
            clash = next((o for o in out if o.target == e.target), None)
            if clash is not None and e.target == "bias":
                raise t.error(f"module '{t.module}' has two bias deltas ('{src(clash)}' and '{src(e)}')")
            if clash is not None:
                raise t.error(f"module '{t.module}' has both {clash.kind} weights and '{src(e)}'")
            out.append(e)
        if entries:
            used |= kind.roles
    if t.dora is not None and any(e.base_dependent for e in out):
        bad = next(e for e in out if e.base_dependent)
        raise t.error(f"module '{t.module}' combines DoRA ('{t.keys.get('dora_scale') or t.keys['magnitude']}') "
                      f"with {bad.kind.upper()}; DoRA is supported on LoRA, LoHa and LoKr modules only")
    if not out and set(t.slot) == {"alpha"}:
        LOG.warning("%s: '%s' has no adapter weights; ignored", t.path, t.keys["alpha"])
        return []
    if not out or ("dora_scale" in t and not any(e.takes_dora for e in out)):
        lone = t.keys.get("alpha") or t.keys.get("dora_scale") or next(iter(t.keys.values()))
        raise t.error(f"'{lone}' has no adapter weights for module '{t.module}'")
    leftover = set(t.slot) - used
    if leftover:
        raise t.error(f"'{t.keys[sorted(leftover)[0]]}' does not fit module '{t.module}' ({out[0].kind} adapter)")
    return out
