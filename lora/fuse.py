"""Exact fp32 weight deltas for a set of adapter entries, one host weight at a time: the one-GEMM combine and DoRA.

One algorithm: for every host weight touched by the given entries,

* all plain LoRA/LoCon entries without DoRA (the ``gemm`` kinds) are fused in ONE fp32 GEMM
  ("cat" trick, exact):  ΔW = [s₁·B₁ | s₂·B₂ | …] @ [A₁; A₂; …]
  with sᵢ = strengthᵢ · keyscaleᵢ · alphaᵢ / rankᵢ and (Bᵢ, Aᵢ) = ``entry.factors()``;
* every other entry adds ``strength · entry.delta(...)`` in fp32 (LoHa, LoKr, full diffs; GLoRA, OFT/BOFT and IA3
  against the base weight W, strength scaling the full-strength delta; formulas in ``lora.adapters``);
* kohya/LyCORIS DoRA entries (``dora_scale``) follow ComfyUI
  ``weight_adapter.base.weight_decompose``::

      W  = base weight (fp32, from ``base_weight_fn``)
      W' = W + (alpha/rank)·ΔW_adapter
      n  = ‖W‖ per output row      if dora_scale.shape[0] == W.shape[0]   (ComfyUI uses the *base* weight here)
         = ‖W'‖ per input column   otherwise (norm over all dims but 1)
      W'' = W' · dora_scale / (n + eps_fp32)
      ΔW_dora = strength · (W'' − W)

* PEFT/diffusers DoRA entries (``lora_magnitude_vector``, ``entry.dora_norm == "peft"``) follow PEFT's merge
  (``peft/tuners/lora/dora.py``): the magnitude m has one value per output channel (stored [out], or
  [1, out, 1, 1] for convs) and the norm is always that of the *combined* weight::

      n   = ‖W'‖ per output row (norm over all dims but 0)
      W'' = W' · m[:, None, …] / (n + eps_fp32)
      ΔW_dora = strength · (W'' − W)

  ComfyUI applies DoRA to the *running* weight (after earlier patches in the chain); here it is always computed
  against the original base weight, i.e. as if the DoRA adapter came first. This makes the result order-independent.

The node layer adds the summed fp32 delta into the host's fp32 working copy of the weight (``key_delta(out=...)``)
and the host rounds once into the weight dtype. Memory: one key at a time, so the transient cost is one layer's
fp32 delta plus its factors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .adapters import DORA_NORM_PEFT, Entry
from .adapters.base import META, shape_error

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


def _out_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm per output row (over all dims but 0), shaped [out, 1, …]."""
    return w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))


def _in_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm per input column (over all dims but 1), shaped [1, in, 1, …]."""
    return (w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1))


def dora_delta(entry: Entry, key: str, shape: Sequence[int], strength: float, base_weight: torch.Tensor,
               device: torch.device | None = None) -> torch.Tensor:
    """DoRA delta ``strength·(W'' − W)`` of one entry against the base weight (formulas in the module doc)."""
    shape = tuple(int(s) for s in shape)
    w = base_weight.to(device=device, dtype=torch.float32)
    if tuple(w.shape) != shape:
        raise shape_error(entry, key, tuple(w.shape), shape)
    w_calc = w + entry.delta(key, shape, device)
    ds = entry.dora_scale.to(device=device, dtype=torch.float32)
    eps = torch.finfo(torch.float32).eps
    if _is_peft_dora(entry):
        ds, norm = ds.reshape(peft_magnitude_shape(entry, key, shape)), _out_norm(w_calc)
    elif ds.ndim == 0 or not shape:
        raise ValueError(f"{entry.file}: '{_dora_key(entry)}' has shape {tuple(ds.shape)}; a DoRA magnitude has one "
                         f"value per output (or input) channel of model weight '{key}' {tuple(shape)}")
    elif ds.shape[0] == w_calc.shape[0]:
        norm = _out_norm(w)
    else:
        norm = _in_norm(w_calc)
    try:
        w_new = w_calc * (ds / (norm + eps))
    except RuntimeError as e:
        raise ValueError(f"{entry.file}: '{_dora_key(entry)}' shape {tuple(ds.shape)} does not broadcast against "
                         f"model weight '{key}' shape {tuple(shape)}") from e
    if w_new.shape != w.shape:
        raise shape_error(entry, key, tuple(w_new.shape), shape)
    return (w_new - w).mul_(strength)


# ---------------------------------------------------------------- one key

def check_key_shapes(items: Sequence[tuple[Entry, float]], key: str, shape: Sequence[int]) -> None:
    """Raise the shape errors ``key_delta(items, key, shape)`` would raise, without computing anything.

    Plain LoRAs, including PEFT DoRA ones (factors plus magnitude length), are checked from their tensor shapes
    (microseconds; the fuse node checks every key up front); other kinds compute on the meta device. kohya/LyCORIS
    DoRA entries (``dora_scale``) are applied on the meta device against a base weight of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    for entry, strength in items:
        if strength == 0.0:
            continue
        try:
            if entry.dora_scale is not None and not _is_peft_dora(entry):
                dora_delta(entry, key, shape, 1.0, torch.empty(shape, device=META), META)
            else:
                entry.check_shape(key, shape)
        except (RuntimeError, IndexError) as e:  # factor shapes torch cannot combine (einsum / kron / matmul)
            raise ValueError(f"{entry.file}: {entry.kind} module '{entry.name}' has factor shapes that cannot make "
                             f"'{key}' {list(shape)} ({e})") from None
        if _is_peft_dora(entry):
            peft_magnitude_shape(entry, key, shape)


def key_delta(items: Sequence[tuple[Entry, float]], key: str, shape: Sequence[int],
              base_weight_fn: BaseWeightFn | None = None, device: torch.device | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Summed fp32 delta for one host key from ``(entry, effective_strength)`` pairs.

    Plain LoRAs: one GEMM over the rank-concatenated factors. Others: added one by one.
    With ``out`` (a contiguous fp32 tensor of ``shape``, e.g. the weight being patched) the delta is accumulated
    into it -- the GEMM writes straight into ``out`` (``addmm_``), so no delta-sized tensor is allocated.
    """
    shape = tuple(int(s) for s in shape)
    bs: list[torch.Tensor] = []
    as_: list[torch.Tensor] = []
    rest: list[tuple[Entry, float]] = []
    for entry, strength in items:
        if entry.gemm and entry.dora_scale is None:
            if strength == 0.0:
                continue
            entry.check_shape(key, shape)
            b, a = entry.factors(device)
            bs.append(b * (strength * entry.scale))
            as_.append(a)
        else:
            rest.append((entry, strength))
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"key_delta: out for '{key}' must be a contiguous float32 tensor of shape {shape}")
        total = out
        if bs:
            total.view(shape[0], -1).addmm_(torch.cat(bs, dim=1), torch.cat(as_, dim=0))
    elif bs:
        total = (torch.cat(bs, dim=1) @ torch.cat(as_, dim=0)).reshape(shape)
    else:
        total = torch.zeros(shape, dtype=torch.float32, device=device)
    base: torch.Tensor | None = None

    def base_for(entry: Entry, what: str) -> torch.Tensor:
        nonlocal base
        if base_weight_fn is None:
            raise ValueError(f"{entry.file}: module '{entry.name}' is {what} and needs the base weight of '{key}'; "
                             f"pass base_weight_fn")
        if base is None:
            base = base_weight_fn(key)
        return base

    for entry, strength in rest:
        if entry.dora_scale is not None:
            total += dora_delta(entry, key, shape, strength, base_for(entry, f"DoRA (has '{_dora_key(entry)}')"),
                                device)
        elif strength != 0.0:
            w = base_for(entry, entry.kind.upper()) if entry.base_dependent else None
            d = entry.delta(key, shape, device, w)
            total += d.mul_(strength) if strength != 1.0 else d
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
