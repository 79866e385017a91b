"""IA3 (LyCORIS): W' = W ⊙ (1 + w) along the output axis, or the input axis when ``on_input``; ΔW = W ⊙ w,
computed against the base weight W. Core ComfyUI has no IA3 and skips these keys.

Tensor names: ``<m>.weight`` + ``<m>.on_input`` (a scalar flag); a ``.weight`` without ``.on_input`` is not IA3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix, fp32, src


@dataclass
class Ia3Module(ModuleEntry):
    """IA3: ΔW = W ⊙ w along one axis. Needs the base weight."""

    weight: torch.Tensor = None  # type: ignore[assignment]
    on_input: bool = False
    kind = "ia3"
    base_dependent = True

    @property
    def scale(self) -> float:
        return 1.0

    def make_delta(self, key, shape, device, base) -> torch.Tensor:
        v = fp32(self.weight, device).reshape(-1)
        axis = 1 if self.on_input else 0
        if len(shape) <= axis or v.numel() != shape[axis]:
            side = "input" if self.on_input else "output"
            raise ValueError(f"{self.file}: IA3 '{src(self)}' has {v.numel()} values but model weight '{key}' has "
                             f"{shape[axis] if len(shape) > axis else '?'} {side} channels (shape {tuple(shape)}); "
                             f"the adapter does not fit this model")
        view = [1] * len(shape)
        view[axis] = -1
        return base * v.reshape(view)


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    if "ia3_on_input" not in t:
        return []
    if "ia3_weight" not in t:
        raise t.error(f"IA3 module '{t.module}' lacks '{t.module}.weight'")
    flag = t.get("ia3_on_input")
    if flag.numel() != 1:
        raise t.error(f"'{t.keys['ia3_on_input']}' must be a scalar, got shape {tuple(flag.shape)}")
    return [Ia3Module(weight=t.get("ia3_weight"), on_input=bool(flag.reshape(()).item()),
                      **t.fields("ia3", ["ia3_weight", "ia3_on_input"], alpha=False))]


KIND = AdapterKind("IA3", (Suffix(".on_input", "ia3_on_input", "ia3"),
                           Suffix(".weight", "ia3_weight", "ia3", needs=".on_input")), parse)
