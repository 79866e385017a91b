"""LoHa (LyCORIS): ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b); with Tucker cores t1/t2 each factor is rebuilt as
``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)`` first.

Tensor names: ``<m>.hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``, ``hada_t2``).
rank = w1_b.shape[0]; alpha defaults to the rank. A DoRA magnitude may ride on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix, fp32, shape_error, tucker

NEED = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class LohaModule(ModuleEntry):
    """LoHa: ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b); Tucker form when t1/t2 given."""

    w1_a: torch.Tensor = None  # type: ignore[assignment]
    w1_b: torch.Tensor = None  # type: ignore[assignment]
    w2_a: torch.Tensor = None  # type: ignore[assignment]
    w2_b: torch.Tensor = None  # type: ignore[assignment]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "loha"
    takes_dora = True

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def make_delta(self, key, shape, device, base) -> torch.Tensor:
        def f(t):
            return fp32(t, device)
        if self.t1 is not None and self.t2 is not None:
            m1 = tucker(f(self.t1), f(self.w1_b), f(self.w1_a))
            m2 = tucker(f(self.t2), f(self.w2_b), f(self.w2_a))
        else:
            m1 = f(self.w1_a) @ f(self.w1_b)
            m2 = f(self.w2_a) @ f(self.w2_b)
        if m1.shape != m2.shape:
            raise shape_error(self, key, tuple(m1.shape), shape)
        return m1 * m2


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    if not any(r.startswith("hada_") for r in t.slot):
        return []
    miss = [r for r in NEED if r not in t]
    if miss:
        raise t.error(f"LoHa module '{t.module}' lacks '{t.module}.{miss[0]}'")
    f = t.fields("loha", [*NEED, "hada_t1", "hada_t2"], t.get("hada_t1") is not None)
    e = LohaModule(**{r[5:]: t.get(r) for r in (*NEED, "hada_t1", "hada_t2")}, **f)
    if e.alpha is None:
        e.alpha = float(e.rank)
    return [e]


KIND = AdapterKind("LoHa", tuple(Suffix("." + r, r, "loha") for r in (*NEED, "hada_t1", "hada_t2")), parse)
