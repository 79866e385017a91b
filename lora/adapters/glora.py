"""GLoRA (LyCORIS): ΔW = scale · (W ×_in (a1 @ a2) + b1 @ b2), computed against the base weight W.

New LyCORIS layout: a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in·k·k] (1×1 convs for a1/a2 on conv layers);
old layout (LyCORIS < 2): ΔW = scale · ((W_flat @ a2) @ a1 + b2 @ b1) with a1 [r, in], a2 [in, r], b1 [r, in],
b2 [out, r]. The layout comes from the shapes, as ComfyUI picks it. scale = alpha / rank (alpha 0/None: 1).

Tensor names: ``<m>.a1.weight``, ``a2.weight``, ``b1.weight``, ``b2.weight``.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix, fp32, shape_error, src

NEED = ("glora_a1", "glora_a2", "glora_b1", "glora_b2")


@dataclass
class GloraModule(ModuleEntry):
    """GLoRA: ΔW = scale · (W·A + B), A = a1 @ a2 acting on the input axis, B = b1 @ b2. Needs the base weight."""

    a1: torch.Tensor = None  # type: ignore[assignment]
    a2: torch.Tensor = None  # type: ignore[assignment]
    b1: torch.Tensor = None  # type: ignore[assignment]
    b2: torch.Tensor = None  # type: ignore[assignment]
    kind = "glora"
    base_dependent = True

    @property
    def rank(self) -> int:
        new = self.b2.shape[0] == self.b1.shape[1] == self.a1.shape[1] == self.a2.shape[0]
        return int(self.a2.shape[0] if new else self.a1.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank; alpha None or 0 means rank (LyCORIS: no scaling)."""
        if not self.alpha:
            return 1.0
        return float(self.alpha) / float(self.rank)

    def layout(self, shape: Sequence[int]) -> tuple[str, int]:
        """("new" | "old", rank) against weight ``shape`` (ComfyUI's rule for ambiguous shapes)."""
        a1, a2, b1, b2 = (t.reshape(t.shape[0], -1).shape for t in (self.a1, self.a2, self.b1, self.b2))
        old = b2[1] == b1[0] == a1[0] == a2[1]
        new = b2[0] == b1[1] == a1[1] == a2[0]
        if old and new and not (a2[0] == shape[0] and len(shape) >= 2 and shape[0] == shape[1]):
            old = False
        if old:
            return "old", int(a1[0])
        if new:
            return "new", int(a2[0])
        raise ValueError(f"{self.file}: GLoRA module '{self.name}' factors a1 {tuple(self.a1.shape)}, a2 "
                         f"{tuple(self.a2.shape)}, b1 {tuple(self.b1.shape)}, b2 {tuple(self.b2.shape)} share no "
                         f"rank ('{src(self)}')")

    def delta_scale(self, shape) -> float:
        return float(self.alpha) / self.layout(shape)[1] if self.alpha else 1.0

    def make_delta(self, key, shape, device, base) -> torch.Tensor:
        if len(shape) < 2:
            raise shape_error(self, key, (), shape)
        layout, _ = self.layout(shape)

        def f(t):
            return fp32(t, device).reshape(t.shape[0], -1)
        a1, a2, b1, b2 = f(self.a1), f(self.a2), f(self.b1), f(self.b2)
        try:
            if layout == "new":
                if a1.shape[0] != shape[1] or a2.shape[1] != shape[1]:
                    raise shape_error(self, key, (a1.shape[0], a2.shape[1]), shape)
                wa = torch.einsum("oi...,ir->or...", base, a1)
                return torch.einsum("or...,rj->oj...", wa, a2) + (b1 @ b2).reshape(shape)
            return ((base.reshape(shape[0], -1) @ a2) @ a1 + b2 @ b1).reshape(shape)
        except RuntimeError as e:
            raise shape_error(self, key, (b1.shape[0], b2.shape[-1]), shape) from e


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    if not any(r in t for r in NEED):
        return []
    miss = [r for r in NEED if r not in t]
    if miss:
        raise t.error(f"GLoRA module '{t.module}' lacks '{t.module}.{miss[0][6:]}.weight'")
    flat = next((r for r in NEED if t.get(r).ndim < 2), None)
    if flat is not None:
        raise t.error(f"'{t.keys[flat]}' has shape {tuple(t.get(flat).shape)}; GLoRA factors are matrices")
    return [GloraModule(**{r[6:]: t.get(r) for r in NEED}, **t.fields("glora", NEED))]


KIND = AdapterKind("GLoRA", tuple(Suffix(f".{r[6:]}.weight", r, "glora") for r in NEED), parse)
