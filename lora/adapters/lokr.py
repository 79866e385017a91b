"""LoKr (LyCORIS): ΔW = scale · kron(W1, W2), each factor whole or low-rank (``_a @ _b``); W2 may have a Tucker
core (``lokr_t2``, LyCORIS' default for k×k convs), rebuilt as ``einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a)``.

Tensor names: ``<m>.lokr_w1`` or ``lokr_w1_a/_b``; ``lokr_w2`` or ``lokr_w2_a/_b`` (+ ``lokr_t2``).
rank = w2_b.shape[0] if W2 is factored, else w1_b.shape[0], else undefined (scale 1), as in ComfyUI's LoKrAdapter;
alpha defaults to the rank. A DoRA magnitude may ride on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix, fp32, tucker

ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class LokrModule(ModuleEntry):
    """LoKr: ΔW = scale · kron(W1, W2)."""

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "lokr"
    takes_dora = True

    @property
    def rank(self) -> int | None:
        if self.w2 is None and self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1 is None and self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None

    def make_delta(self, key, shape, device, base) -> torch.Tensor:
        def f(t):
            return fp32(t, device)
        w1 = f(self.w1) if self.w1 is not None else f(self.w1_a) @ f(self.w1_b)
        if self.w2 is not None:
            w2 = f(self.w2)
        elif self.t2 is not None:
            w2 = tucker(f(self.t2), f(self.w2_b), f(self.w2_a))
        else:
            w2 = f(self.w2_a) @ f(self.w2_b)
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1.contiguous(), w2.contiguous())  # the Tucker rebuild is a permuted view


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    if not any(r.startswith("lokr_") for r in t.slot):
        return []
    w1_ok = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
    w2_ok = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
    if not (w1_ok and w2_ok):
        raise t.error(f"LoKr module '{t.module}' needs lokr_w1 (or lokr_w1_a/_b) and lokr_w2 (or lokr_w2_a/_b)")
    f = t.fields("lokr", ROLES, t.get("lokr_t2") is not None)
    e = LokrModule(**{r[5:]: t.get(r) for r in ROLES}, **f)
    if e.alpha is None and e.rank is not None:
        e.alpha = float(e.rank)
    return [e]


KIND = AdapterKind("LoKr", tuple(Suffix("." + r, r, "lokr") for r in ROLES), parse)
