"""Full diffs (LyCORIS "full"): ΔW = diff for ``<m>.diff``, Δb = diff_b for ``<m>.diff_b`` (the module's bias), and
LightX2V's ``<m>.diff_m`` for the ``<m>.modulation`` table of a Wan block (its LoRA extractor's name; core ComfyUI
does not load it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix


@dataclass
class DiffModule(ModuleEntry):
    """Full weight delta: ΔW = diff."""

    diff: torch.Tensor = None  # type: ignore[assignment]
    kind = "diff"

    def make_delta(self, key, shape, device, base) -> torch.Tensor:
        return self.diff.to(device=device, dtype=torch.float32, copy=True)  # never alias the adapter tensor


@dataclass
class BiasDiffModule(ModuleEntry):
    """Bias delta: Δb = diff (targets the ``.bias`` of the module)."""

    diff: torch.Tensor = None  # type: ignore[assignment]
    kind = "bias_diff"
    target = "bias"
    make_delta = DiffModule.make_delta


def weight_entry(t: ModuleTensors, role: str) -> DiffModule:
    return DiffModule(diff=t.get(role), **t.fields("full", [role], alpha=False))


def bias_entry(t: ModuleTensors, role: str) -> BiasDiffModule:
    return BiasDiffModule(name=t.module, file=t.path, alpha=None, alpha_source="n/a", style="full",
                          source_keys=[t.keys[role]], diff=t.get(role))


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    return ([weight_entry(t, "diff")] if "diff" in t else []) + ([bias_entry(t, "diff_b")] if "diff_b" in t else [])


KIND = AdapterKind("full diff", (Suffix(".diff", "diff", "full"), Suffix(".diff_b", "diff_b", "full"),
                                 Suffix(".diff_m", "diff", "full", module_tail=".modulation")), parse)
