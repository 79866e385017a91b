"""Adapter entries whose delta covers only some rows of a host weight: diffusers' separate to_q / to_k / to_v /
proj_mlp of a fused qkv (+ MLP) weight (Flux, SD3, HunyuanVideo), or its (scale, shift) modulation halves in the
other order.

``PlacedEntry`` wraps an entry with its ``lora.keys.Target``; it behaves like the entry on the whole weight:

* plain LoRA factors: B is scattered into a zero [out, r] matrix at the target's rows, so every adapter on the fused
  weight still goes into the one GEMM of ``lora.fuse.key_delta`` (the zero rows cost out·r, nothing more) and the
  sum stays exact;
* other kinds: the delta is computed on the rows' shape (base-dependent kinds and DoRA see those rows of the base
  weight, as a trainer does on its separate to_q layer) and scattered into a zero full-weight delta.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapters import Entry
from .keys import HostTarget, Target, as_target


class PlacedEntry:
    """``entry`` acting on the rows ``target`` names (see the module doc); every other attribute is the entry's."""

    def __init__(self, entry: Entry, target: Target):
        self.inner, self.target = entry, target

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def rows(self, shape: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(weight rows of the entry's rows, the entry's own shape) against a weight of ``shape``."""
        try:
            idx = self.target.rows(int(shape[0]))
        except ValueError as e:
            raise ValueError(f"{self.inner.file}: module '{self.inner.name}': {e}") from None
        return idx, (len(idx), *[int(s) for s in shape[1:]])

    def take(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return w.index_select(0, idx.to(w.device))

    def put(self, d: torch.Tensor, idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        out = torch.zeros(tuple(int(s) for s in shape), dtype=d.dtype, device=d.device)
        return out.index_copy_(0, idx.to(d.device), d)

    def factors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("PlacedEntry.factors needs the weight shape: use factors_for")

    def factors_for(self, shape: Sequence[int], device: torch.device | None = None):
        idx, _ = self.rows(shape)
        b, a = self.inner.factors(device)
        return self.put(b, idx, (int(shape[0]), b.shape[1])), a

    def check_shape(self, key: str, shape: Sequence[int]) -> None:
        _, sub = self.rows(shape)
        self.inner.check_shape(key, sub)

    def delta(self, key: str, shape: Sequence[int], device: torch.device | None = None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        idx, sub = self.rows(shape)
        d = self.inner.delta(key, sub, device, None if base is None else self.take(base, idx))
        return self.put(d, idx, shape)


def unwrap(entry) -> tuple[Entry, PlacedEntry | None]:
    """(the adapter entry, its placement wrapper or None)."""
    return (entry.inner, entry) if isinstance(entry, PlacedEntry) else (entry, None)


def place(pairs: Sequence[tuple[Entry, float]], matched: dict[str, HostTarget]
          ) -> tuple[list[tuple[Entry, float]], dict[str, str]]:
    """The ``(entry, strength)`` pairs with each entry of a row-range target wrapped in ``PlacedEntry``, and the
    module -> host key map ``lora.merge.plan_merge`` takes. Modules missing from ``matched`` stay as they are (the
    merge plan names them)."""
    out = []
    keys: dict[str, str] = {}
    for e, s in pairs:
        t = matched.get(e.name)
        if t is None:
            out.append((e, s))
            continue
        t = as_target(t)
        keys[e.name] = t.key
        out.append((e if t.whole else PlacedEntry(e, t), s))
    return out, keys
