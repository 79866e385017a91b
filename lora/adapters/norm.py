"""LyCORIS norm training (``train_norm``): ``<m>.w_norm`` / ``<m>.b_norm`` are diffs of a norm layer's weight / bias,
applied as full diffs (as core ComfyUI applies them)."""
from __future__ import annotations

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix
from .diff import bias_entry, weight_entry


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    return (([weight_entry(t, "w_norm")] if "w_norm" in t else [])
            + ([bias_entry(t, "b_norm")] if "b_norm" in t else []))


KIND = AdapterKind("norm", (Suffix(".w_norm", "w_norm", "full"), Suffix(".b_norm", "b_norm", "full")), parse)
