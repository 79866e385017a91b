"""Exact weight deltas for a set of adapter entries, one host weight at a time: the one-GEMM combine and DoRA.

One algorithm: for every host weight touched by the given entries,

* all plain LoRA/LoCon entries without DoRA (the ``gemm`` kinds) are fused in ONE fp32 GEMM
  ("cat" trick, exact):  ΔW = [s₁·B₁ | s₂·B₂ | …] @ [A₁; A₂; …]
  with sᵢ = strengthᵢ · keyscaleᵢ · alphaᵢ / rankᵢ and (Bᵢ, Aᵢ) = ``entry.factors()`` (an entry on some rows of a
  fused weight, ``lora.placement.PlacedEntry``, brings its B scattered into those rows of a zero
  matrix);
* every other entry adds ``strength · entry.delta(...)`` in fp32 (LoHa, LoKr, full diffs; GLoRA, OFT/BOFT and IA3
  against the base weight W, strength scaling the full-strength delta; formulas in ``lora.adapters``);
* DoRA entries follow the trainers (normalising the *merged* weight, as they train it)::

      W   = base weight, W' = W + (alpha/rank)·ΔW_adapter (the adapter at full strength)
      kohya/LyCORIS ``dora_scale`` m, by its shape (LyCORIS ``apply_weight_decompose``):
        [out, 1, …] (LyCORIS' default since 2025, wd_on_out): n = ‖W'‖ per output row (norm over all dims but 0)
        [1, in, …]  (older LyCORIS):                        n = ‖W'‖ per input column (norm over all dims but 1)
      PEFT/diffusers ``lora_magnitude_vector`` m ([out] or [1, out, 1, 1], ``entry.dora_norm == "peft"``):
        n = ‖W'‖ per output row (``peft/tuners/lora/dora.py``)
      D   = W' · m / (n + eps), eps = float32 eps as the trainers add it
      ΔW_dora = s·(D − W)                      (strength s; "comfyui" convention, the default)

  ComfyUI 0.3.75's ``weight_decompose`` uses the norm of the *base* weight W for the [out, 1] shape, which is off
  by a few percent of the delta from what LyCORIS trained. The strength convention W + s·(D − W) is ComfyUI's and
  ours; at s = 1 every convention gives D. ``dora_weight`` also offers the trainers' runtime conventions:
  "lycoris" (LyCORIS' multiplier, W' + s·(D − W')) and "peft" (PEFT's adapter weight, which scales ΔW inside the
  norm: m·(W + sΔW)/‖W + sΔW‖).

  DoRA is computed in float64 (plain LoRA factors multiplied in float64; other kinds' deltas built in fp32) against
  the original base weight -- as if the DoRA adapter came first, so the result does not depend on the order -- and a
  weight that carries a DoRA entry gets W + every delta summed in float64 and rounded once.

The node layer adds the summed delta into the host's fp32 working copy of the weight (``key_delta(out=...)``) and
the host rounds once into the weight dtype (stochastically for fp8, as ComfyUI does). Memory: one key at a time, so
the transient cost is one layer's delta plus its factors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .adapters import DORA_NORM_PEFT, Entry
from .adapters.base import shape_error
from .placement import unwrap

BaseWeightFn = Callable[[str], torch.Tensor]
KeyScaleFn = Callable[[Entry, str], float]


def target_key(entry: Entry, host_weight_key: str) -> str:
    """Host key an entry writes to: the weight key, or ``<module>.bias`` for bias deltas."""
    if entry.target == "bias":
        if host_weight_key.endswith(".weight"):
            return host_weight_key[: -len(".weight")] + ".bias"
        return host_weight_key + ".bias"
    return host_weight_key


# ---------------------------------------------------------------- DoRA

DORA_CONVENTIONS = ("comfyui", "lycoris", "peft")


def _dora_key(entry: Entry) -> str:
    """The file's name for the DoRA magnitude of ``entry`` (for error messages)."""
    suffix = "lora_magnitude_vector" if entry.dora_norm == DORA_NORM_PEFT else "dora_scale"
    return next((k for k in entry.source_keys if suffix in k), f"{entry.name}.{suffix}")


def _is_peft_dora(entry: Entry) -> bool:
    return entry.dora_scale is not None and entry.dora_norm == DORA_NORM_PEFT


def peft_magnitude_shape(entry: Entry, key: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape ``[out, 1, …]`` the PEFT magnitude of ``entry`` takes against weight ``shape``.

    Raises ValueError (naming the file, the magnitude key, its shape and the model weight) unless the magnitude
    holds exactly ``shape[0]`` values along a single axis ([out], [1, out, 1, 1], ...).
    """
    m = entry.dora_scale
    vector_like = sum(1 for d in m.shape if d != 1) <= 1
    if len(shape) < 1 or m.numel() != shape[0] or not vector_like:
        raise ValueError(f"{entry.file}: '{_dora_key(entry)}' (PEFT DoRA magnitude) has shape {tuple(m.shape)} "
                         f"but model weight '{key}' has shape {tuple(shape)}; it needs one value per output "
                         f"channel ({shape[0] if shape else '?'}); the adapter does not fit this model")
    return (int(shape[0]), *[1] * (len(shape) - 1))


def dora_axis(entry: Entry, key: str, shape: Sequence[int]) -> int:
    """The axis a DoRA magnitude of ``entry`` keeps against weight ``shape``: 0 (one value per output row: kohya /
    LyCORIS [out, 1, …], PEFT [out]) or 1 (one per input column: LyCORIS [1, in, …]). ValueError naming the file,
    the magnitude key, its shape and the model weight otherwise."""
    shape = tuple(int(s) for s in shape)
    if _is_peft_dora(entry):
        peft_magnitude_shape(entry, key, shape)
        return 0
    m = tuple(entry.dora_scale.shape)
    if len(shape) >= 2 and len(m) == len(shape):
        if m == (shape[0], *[1] * (len(shape) - 1)):
            return 0
        if m == (1, shape[1], *[1] * (len(shape) - 2)):
            return 1
    raise ValueError(f"{entry.file}: '{_dora_key(entry)}' (DoRA magnitude) has shape {m} but model weight '{key}' "
                     f"has shape {shape}; it needs [out, 1, ...] = {(shape[0], *[1] * (len(shape) - 1))} or "
                     f"[1, in, ...]{' = ' + str((1, shape[1], *[1] * (len(shape) - 2))) if len(shape) > 1 else ''}; "
                     f"the adapter does not fit this model")


def _norm(w: torch.Tensor, axis: int) -> torch.Tensor:
    """L2 norm over all dims but ``axis``, shaped to broadcast against ``w``."""
    t = w.transpose(0, axis) if axis else w
    n = t.reshape(t.shape[0], -1).norm(dim=1).reshape(t.shape[0], *[1] * (w.dim() - 1))
    return n.transpose(0, axis) if axis else n


def _delta64(entry: Entry, key: str, shape: tuple[int, ...], device) -> torch.Tensor:
    """The entry's delta at strength 1 in float64: plain LoRA factors multiplied in float64, other kinds' fp32
    deltas widened."""
    if entry.gemm:
        entry.check_shape(key, shape)
        b, a = entry.factors(device)
        return (b.double() @ a.double()).reshape(shape).mul_(entry.scale)
    return entry.delta(key, shape, device).double()


def dora_weight(entry: Entry, key: str, base: torch.Tensor, strength: float, convention: str = "comfyui",
                device: torch.device | None = None) -> torch.Tensor:
    """The float64 weight a DoRA entry gives at ``strength`` (formulas in the module doc; ``base`` the base weight).

    ``convention``: "comfyui" W + s·(D − W) (default), "lycoris" W' + s·(D − W'), "peft" m·(W + sΔW)/‖W + sΔW‖."""
    if convention not in DORA_CONVENTIONS:
        raise ValueError(f"DoRA strength convention must be one of {DORA_CONVENTIONS}, got {convention!r}")
    shape = tuple(int(s) for s in base.shape)
    axis = dora_axis(entry, key, shape)
    w = base.to(device=device, dtype=torch.float64)
    delta = _delta64(entry, key, shape, device)
    m = entry.dora_scale.to(device=device, dtype=torch.float64)
    m = m.reshape(peft_magnitude_shape(entry, key, shape)) if _is_peft_dora(entry) else m
    eps = torch.finfo(torch.float32).eps
    if convention == "peft":
        w_s = w + delta * strength
        return w_s * (m / (_norm(w_s, axis) + eps))
    w_merged = w + delta
    d = w_merged * (m / (_norm(w_merged, axis) + eps))
    if strength == 1.0:
        return d
    ref = w if convention == "comfyui" else w_merged
    return ref + (d - ref) * strength


def dora_delta(entry, key: str, shape: Sequence[int], strength: float, base_weight: torch.Tensor,
               device: torch.device | None = None) -> torch.Tensor:
    """float64 DoRA delta ``strength·(D − W)`` of one entry against the base weight (formulas in the module doc); an
    entry on some rows of the weight works on those rows of the base."""
    shape = tuple(int(s) for s in shape)
    inner, placed = unwrap(entry)
    if tuple(base_weight.shape) != shape:
        raise shape_error(inner, key, tuple(base_weight.shape), shape)
    if placed is not None:
        idx, _ = placed.rows(shape)
        return placed.put(dora_delta(inner, key, (len(idx), *shape[1:]), strength, placed.take(base_weight, idx),
                                     device), idx, shape)
    w = base_weight.to(device=device, dtype=torch.float64)
    return dora_weight(inner, key, w, strength, device=device) - w


# ---------------------------------------------------------------- one key

def check_key_shapes(items: Sequence[tuple[Entry, float]], key: str, shape: Sequence[int]) -> None:
    """Raise the shape errors ``key_delta(items, key, shape)`` would raise, without computing anything.

    Plain LoRAs and DoRA magnitudes are checked from their tensor shapes (microseconds; the fuse node checks every
    key up front, so a bad file never leaves a model half patched); other kinds compute on the meta device."""
    shape = tuple(int(s) for s in shape)
    for entry, strength in items:
        if strength == 0.0:
            continue
        inner, placed = unwrap(entry)
        try:
            entry.check_shape(key, shape)
        except RuntimeError as e:  # factor shapes torch cannot combine (einsum / kron / matmul)
            raise ValueError(f"{inner.file}: {inner.kind} module '{inner.name}' has factor shapes that cannot make "
                             f"'{key}' {list(shape)} ({e})") from None
        if inner.dora_scale is not None:
            sub = placed.rows(shape)[1] if placed is not None else shape
            dora_axis(inner, key, sub)


def _factors(entry, shape: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    inner, placed = unwrap(entry)
    return placed.factors_for(shape, device) if placed is not None else inner.factors(device)


def key_delta(items: Sequence[tuple[Entry, float]], key: str, shape: Sequence[int],
              base_weight_fn: BaseWeightFn | None = None, device: torch.device | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Summed delta for one host key from ``(entry, effective_strength)`` pairs (fp32).

    Plain LoRAs: one GEMM over the rank-concatenated factors. Others: added one by one.
    With ``out`` (a contiguous fp32 tensor of ``shape``, e.g. the weight being patched) the delta is accumulated
    into it -- the GEMM writes straight into ``out`` (``addmm_``), so no delta-sized tensor is allocated. A key with
    a DoRA entry is summed in float64 (``out`` + every delta, rounded once).
    """
    shape = tuple(int(s) for s in shape)
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"key_delta: out for '{key}' must be a contiguous float32 tensor of shape {shape}")
    if any(unwrap(e)[0].dora_scale is not None for e, s in items if s != 0.0):
        total = _key_delta64(items, key, shape, base_weight_fn, device)
        if out is None:
            return total.float()
        return out.copy_(out.double().add_(total))
    bs: list[torch.Tensor] = []
    as_: list[torch.Tensor] = []
    rest: list[tuple[Entry, float]] = []
    for entry, strength in items:
        if unwrap(entry)[0].gemm:
            if strength == 0.0:
                continue
            entry.check_shape(key, shape)
            b, a = _factors(entry, shape, device)
            bs.append(b * (strength * entry.scale))
            as_.append(a)
        else:
            rest.append((entry, strength))
    if out is not None:
        total = out
        if bs:
            total.view(shape[0], -1).addmm_(torch.cat(bs, dim=1), torch.cat(as_, dim=0))
    elif bs:
        total = (torch.cat(bs, dim=1) @ torch.cat(as_, dim=0)).reshape(shape)
    else:
        total = torch.zeros(shape, dtype=torch.float32, device=device)
    base = _BaseCache(key, base_weight_fn)
    for entry, strength in rest:
        if strength != 0.0:
            d = entry.delta(key, shape, device, base.get(entry) if entry.base_dependent else None)
            total += d.mul_(strength) if strength != 1.0 else d
    return total


class _BaseCache:
    """The base weight of one key, read once, for the entries that need it."""

    def __init__(self, key: str, fn: BaseWeightFn | None):
        self.key, self.fn, self.w = key, fn, None

    def get(self, entry, what: str = "") -> torch.Tensor:
        if self.fn is None:
            inner = unwrap(entry)[0]
            raise ValueError(f"{inner.file}: module '{inner.name}' is {what or inner.kind.upper()} and needs the base "
                             f"weight of '{self.key}'; pass base_weight_fn")
        if self.w is None:
            self.w = self.fn(self.key)
        return self.w


def _key_delta64(items, key: str, shape: tuple[int, ...], base_weight_fn, device) -> torch.Tensor:
    """float64 sum of every entry's delta on a key that carries a DoRA entry."""
    base = _BaseCache(key, base_weight_fn)
    total = torch.zeros(shape, dtype=torch.float64, device=device)
    for entry, strength in items:
        inner, placed = unwrap(entry)
        if inner.dora_scale is not None:
            w = base.get(entry, f"DoRA (has '{_dora_key(inner)}')")
            total += dora_delta(entry, key, shape, strength, w, device)
        elif strength != 0.0:
            if inner.gemm:
                entry.check_shape(key, shape)
                b, a = _factors(entry, shape, device)
                total += (b.double() @ a.double()).reshape(shape).mul_(strength * inner.scale)
            else:
                d = entry.delta(key, shape, device, base.get(entry) if inner.base_dependent else None)
                total += d.double().mul_(strength)
    return total


def group_by_key(entries: Sequence[tuple[Entry, float]], module_to_host: dict[str, str],
                 key_scale: KeyScaleFn | None = None) -> dict[str, list[tuple[Entry, float]]]:
    """Group ``(entry, strength)`` by target host key (insertion order), folding in ``key_scale``.

    Raises ValueError naming the file and module for entries with no host key.
    """
    groups: dict[str, list[tuple[Entry, float]]] = {}
    for entry, strength in entries:
        hk = module_to_host.get(entry.name)
        if hk is None:
            raise ValueError(f"{entry.file}: module '{entry.name}' matches no model weight; map it with "
                             f"lora.keys first (or drop unmatched modules)")
        tk = target_key(entry, hk)
        s = float(strength) * (float(key_scale(entry, tk)) if key_scale is not None else 1.0)
        groups.setdefault(tk, []).append((entry, s))
    return groups
