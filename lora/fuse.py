"""Exact fp32 weight deltas for a set of adapter entries, one host weight at a time.

One algorithm: for every host weight touched by the given entries,

* all plain LoRA/LoCon entries without DoRA are fused in ONE fp32 GEMM
  ("cat" trick, exact):  ΔW = [s₁·B₁ | s₂·B₂ | …] @ [A₁; A₂; …]
  with sᵢ = strengthᵢ · keyscaleᵢ · alphaᵢ / rankᵢ, Bᵢ = up.flatten(1) and
  Aᵢ = down.flatten(1) (LoCon Tucker: A = mid ∘ down first; kohya conv k×k:
  down [r, in, kh, kw] and up [out, r, 1, 1] give [out, in·kh·kw]);
* LoHa, LoKr and full ``.diff`` entries are added separately in fp32;
* kohya/LyCORIS DoRA entries (``dora_scale``) follow ComfyUI
  ``weight_adapter.base.weight_decompose``::

      W  = base weight (fp32, from ``base_weight_fn``)
      W' = W + (alpha/rank)·ΔW_lora
      n  = ‖W‖ per output row      if dora_scale.shape[0] == W.shape[0]   (ComfyUI uses the *base*
                                                                             weight here; "lycoris" mode uses W')
         = ‖W'‖ per input column   otherwise (norm over all dims but 1)
      W'' = W' · dora_scale / (n + eps_fp32)
      ΔW_dora = strength · (W'' − W)

* PEFT/diffusers DoRA entries (``lora_magnitude_vector``, ``entry.dora_norm ==
  "peft"``) follow PEFT's merge (``peft/tuners/lora/dora.py``), whatever
  ``dora_mode`` is: the magnitude m has one value per output channel
  (stored [out], or [1, out, 1, 1] for convs) and the norm is always that of
  the *combined* weight::

      n   = ‖W'‖ per output row (norm over all dims but 0)
      W'' = W' · m[:, None, …] / (n + eps_fp32)
      ΔW_dora = strength · (W'' − W)

  ComfyUI applies DoRA to the *running* weight (after earlier patches in the
  chain); here it is always computed against the original base weight, i.e. as
  if the DoRA adapter came first. This makes the result order-independent.

* GLoRA, OFT/BOFT and IA3 entries (LyCORIS) are also computed against the base
  weight W, with strength s scaling the full-strength delta (as for DoRA)::

      GLoRA  ΔW = s · scale · (W ×_in (a1 @ a2) + b1 @ b2)      new LyCORIS layout
             ΔW = s · scale · ((W_flat @ a2) @ a1 + b2 @ b1)      old layout (< 2.0)
             scale = alpha / rank (alpha 0/None → 1); layout from the shapes, as ComfyUI picks it
      OFT    Q = B − Bᵀ per block; if alpha > 0 and ‖Q‖ > alpha·out: Q ← Q·alpha·out/‖Q‖
             R = (I + Q)(I − Q)⁻¹;  W' = rescale ⊙ (Rᵀ applied per block of n output rows)
             ΔW = s · (W' − W)
      BOFT   the same Cayley R per block and stage; stage i permutes the output
             rows in groups of 2·k (k = 2ⁱ·b/2), applies R block-wise, permutes back
      IA3    ΔW = s · W ⊙ w   (w along the output axis, or the input axis when on_input)

  The constraint threshold alpha·out_dim is the trainers' (LyCORIS ``diag-oft``
  and ``boft``, sd-scripts ``networks/oft.py``); ComfyUI 0.3.75 clamps at alpha,
  ignores OFT's ``rescale`` and applies the OFT/BOFT strength twice. At strength 1,
  with no clamp active and (for OFT) no rescale, the results agree with ComfyUI.
  For BOFT with several stages and s ≠ 1, LyCORIS interpolates every stage
  (R·s + (1 − s)·I); here s scales the full delta, like every other adapter.

``apply_delta`` adds the summed fp32 delta to the fp32 base weight and rounds
once into the weight dtype (round-to-nearest; fp8 stochastic rounding belongs
to the kernels layer). Memory: ``iter_deltas`` yields one key at a time, so
the transient cost is one layer's fp32 delta plus its factors.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .formats import (BASE_DEPENDENT, DORA_NORM_PEFT, BiasDiffModule, DiffModule, Entry, GloraModule, Ia3Module,
                      LohaModule, LokrModule, LoraModule, OftModule)

LOG = logging.getLogger("fewstep")

BaseWeightFn = Callable[[str], torch.Tensor]
KeyScaleFn = Callable[[Entry, str], float]


def target_key(entry: Entry, host_weight_key: str) -> str:
    """Host key an entry writes to: the weight key, or ``<module>.bias`` for bias diffs."""
    if isinstance(entry, BiasDiffModule):
        if host_weight_key.endswith(".weight"):
            return host_weight_key[: -len(".weight")] + ".bias"
        return host_weight_key + ".bias"
    return host_weight_key


def _src(entry: Entry) -> str:
    """The file's first tensor name of ``entry`` (for error messages)."""
    return entry.source_keys[0] if entry.source_keys else entry.name


def _shape_error(entry: Entry, key: str, got: Sequence[int], want: Sequence[int]) -> ValueError:
    return ValueError(f"{entry.file}: '{_src(entry)}' gives a delta of shape {tuple(got)} but model weight '{key}' has "
                      f"shape {tuple(want)}; the adapter does not fit this model (wrong base model?)")


def lora_factors(entry: LoraModule, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (B [out, r], A [r, in·k·k]) with ΔW_flat = B @ A (scale not applied)."""
    up = entry.up.to(device=device, dtype=torch.float32)
    down = entry.down.to(device=device, dtype=torch.float32)
    if entry.mid is not None:
        mid = entry.mid.to(device=device, dtype=torch.float32)
        # A[a, i, k, l] = Σ_b mid[a, b, k, l] · down[b, i]
        down2 = down.reshape(down.shape[0], -1)
        a = torch.einsum("abkl,bi->aikl", mid, down2)
        return up.reshape(up.shape[0], -1), a.reshape(a.shape[0], -1)
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def lora_factor_shape(entry: LoraModule) -> tuple[int, int, int, int]:
    """Shapes of ``lora_factors(entry)`` from tensor shapes alone: (B rows, B cols, A rows, A cols)."""
    up, down, mid = entry.up, entry.down, entry.mid
    b_cols = math.prod(up.shape[1:])
    if mid is None:
        return up.shape[0], b_cols, down.shape[0], math.prod(down.shape[1:])
    if mid.ndim != 4 or mid.shape[1] != down.shape[0]:
        src = _src(entry)
        raise ValueError(f"{entry.file}: '{src}' Tucker mid {tuple(mid.shape)} does not fit down "
                         f"{tuple(down.shape)}")
    return up.shape[0], b_cols, mid.shape[0], math.prod(down.shape[1:]) * math.prod(mid.shape[2:])


def _check_lora_shape(entry: LoraModule, key: str, shape: Sequence[int]) -> None:
    """ValueError (file, key, shapes) unless ``lora_factors(entry)`` multiply into a delta of ``shape``."""
    b_rows, b_cols, a_rows, a_cols = lora_factor_shape(entry)
    if b_cols != a_rows:
        src = _src(entry)
        raise ValueError(f"{entry.file}: module '{entry.name}' rank mismatch: up {tuple(entry.up.shape)} "
                         f"vs down {tuple(entry.down.shape)} ('{src}')")
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if len(shape) < 2 or b_rows != shape[0] or a_cols != cols:
        raise _shape_error(entry, key, (b_rows, a_cols), shape)


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


def check_key_shapes(items: Sequence[tuple[Entry, float]], key: str, shape: Sequence[int]) -> None:
    """Raise the shape errors ``key_delta(items, key, shape)`` would raise, without computing anything.

    Plain LoRAs, including PEFT DoRA ones (factors plus magnitude length), are checked from their tensor shapes
    (microseconds; the fuse node checks every key up front); other kinds go through ``raw_delta`` on the meta
    device. kohya/LyCORIS DoRA entries (``dora_scale``) need the base weight and are checked when they are applied.
    """
    shape = tuple(int(s) for s in shape)
    for entry, strength in items:
        if strength == 0.0 or (getattr(entry, "dora_scale", None) is not None and not _is_peft_dora(entry)):
            continue
        try:
            if isinstance(entry, LoraModule):
                _check_lora_shape(entry, key, shape)
            elif isinstance(entry, BASE_DEPENDENT):
                base_delta(entry, key, shape, 1.0, torch.empty(shape, device="meta"), torch.device("meta"))
            else:
                raw_delta(entry, key, shape, device=torch.device("meta"))
        except RuntimeError as e:  # factor shapes torch cannot combine (einsum / kron / matmul)
            raise ValueError(f"{entry.file}: {entry.kind} module '{entry.name}' has factor shapes that cannot make "
                             f"'{key}' {list(shape)} ({e})") from None
        if _is_peft_dora(entry):
            peft_magnitude_shape(entry, key, shape)


def raw_delta(entry: Entry, key: str, shape: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """Unscaled-by-strength fp32 delta of one non-DoRA entry, including its alpha/rank scale, shaped like the weight."""
    n = math.prod(shape)
    if isinstance(entry, LoraModule):
        _check_lora_shape(entry, key, shape)
        b, a = lora_factors(entry, device)
        return (b @ a).mul_(entry.scale).reshape(shape)
    if isinstance(entry, LohaModule):
        f = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
        if entry.t1 is not None and entry.t2 is not None:
            m1 = torch.einsum("ijkl,jr,ip->prkl", f(entry.t1), f(entry.w1_b), f(entry.w1_a))
            m2 = torch.einsum("ijkl,jr,ip->prkl", f(entry.t2), f(entry.w2_b), f(entry.w2_a))
        else:
            m1 = f(entry.w1_a) @ f(entry.w1_b)
            m2 = f(entry.w2_a) @ f(entry.w2_b)
        if m1.shape != m2.shape:
            raise _shape_error(entry, key, tuple(m1.shape), shape)
        d = m1 * m2
    elif isinstance(entry, LokrModule):
        f = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
        w1 = f(entry.w1) if entry.w1 is not None else f(entry.w1_a) @ f(entry.w1_b)
        if entry.w2 is not None:
            w2 = f(entry.w2)
        elif entry.t2 is not None:
            w2 = torch.einsum("ijkl,jr,ip->prkl", f(entry.t2), f(entry.w2_b), f(entry.w2_a))
        else:
            w2 = f(entry.w2_a) @ f(entry.w2_b)
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        d = torch.kron(w1.contiguous(), w2.contiguous())  # the Tucker rebuild is a permuted view
    elif isinstance(entry, (DiffModule, BiasDiffModule)):
        d = entry.diff.to(device=device, dtype=torch.float32, copy=True)  # never alias the adapter tensor
    elif isinstance(entry, BASE_DEPENDENT):
        raise ValueError(f"{entry.file}: module '{entry.name}' is {entry.kind.upper()}, whose delta depends on the "
                         f"base weight of '{key}'; use base_delta (or key_delta with base_weight_fn)")
    else:  # pragma: no cover
        raise ValueError(f"{getattr(entry, 'file', '?')}: unsupported entry type {type(entry).__name__}")
    if d.numel() != n or (len(shape) >= 1 and d.shape[0] != shape[0]):
        raise _shape_error(entry, key, tuple(d.shape), shape)
    d = d.reshape(shape)
    s = entry.scale
    return d.mul_(s) if s != 1.0 else d


def glora_layout(entry: GloraModule, shape: Sequence[int]) -> tuple[str, int]:
    """("new" | "old", rank) of a GLoRA entry against weight ``shape`` (ComfyUI's rule for ambiguous shapes)."""
    a1, a2, b1, b2 = (t.reshape(t.shape[0], -1).shape for t in (entry.a1, entry.a2, entry.b1, entry.b2))
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    if old and new and not (a2[0] == shape[0] and len(shape) >= 2 and shape[0] == shape[1]):
        old = False
    if old:
        return "old", int(a1[0])
    if new:
        return "new", int(a2[0])
    raise ValueError(f"{entry.file}: GLoRA module '{entry.name}' factors a1 {tuple(entry.a1.shape)}, a2 "
                     f"{tuple(entry.a2.shape)}, b1 {tuple(entry.b1.shape)}, b2 {tuple(entry.b2.shape)} share no rank "
                     f"('{_src(entry)}')")


def _glora_delta(entry: GloraModule, key: str, shape: tuple, w: torch.Tensor, device) -> torch.Tensor:
    layout, rank = glora_layout(entry, shape)
    f = lambda t: t.to(device=device, dtype=torch.float32).reshape(t.shape[0], -1)  # noqa: E731
    a1, a2, b1, b2 = f(entry.a1), f(entry.a2), f(entry.b1), f(entry.b2)
    try:
        if layout == "new":
            if a1.shape[0] != shape[1] or a2.shape[1] != shape[1]:
                raise _shape_error(entry, key, (a1.shape[0], a2.shape[1]), shape)
            wa = torch.einsum("oi...,ir->or...", w, a1)
            d = torch.einsum("or...,rj->oj...", wa, a2) + (b1 @ b2).reshape(shape)
        else:
            d = ((w.reshape(shape[0], -1) @ a2) @ a1 + b2 @ b1).reshape(shape)
    except RuntimeError as e:
        raise _shape_error(entry, key, (b1.shape[0], b2.shape[-1]), shape) from e
    alpha = entry.alpha
    return d.mul_(float(alpha) / rank) if alpha else d


def _cayley(entry: OftModule, out_dim: int, device) -> torch.Tensor:
    """Per-block rotations R = (I + Q)(I − Q)⁻¹ of the skew part Q, norm-clamped to alpha·out_dim."""
    b = entry.blocks.to(device=device, dtype=torch.float32)
    q = b - b.transpose(-1, -2)
    limit = float(entry.alpha or 0.0) * out_dim
    if limit > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        q = torch.where(norm > limit, q * (limit / norm), q)
    eye = torch.eye(b.shape[-1], device=device, dtype=torch.float32)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _oft_rows_error(entry: OftModule, key: str, k: int, n: int, shape: tuple) -> ValueError:
    return ValueError(f"{entry.file}: '{_src(entry)}' holds {k} blocks of {n} rows ({k * n} output channels) but "
                      f"model weight '{key}' has shape {tuple(shape)}; the adapter does not fit this model "
                      f"(wrong base model?)")


def _oft_merged(entry: OftModule, key: str, shape: tuple, w: torch.Tensor, device) -> torch.Tensor:
    out = shape[0]
    blocks = entry.blocks
    if blocks.ndim == 3:
        k, n = int(blocks.shape[0]), int(blocks.shape[1])
        if k * n != out:
            raise _oft_rows_error(entry, key, k, n, shape)
        r = _cayley(entry, out, device)
        merged = torch.einsum("knm,kn...->km...", r, w.reshape(k, n, *shape[1:])).reshape(shape)
    else:
        m, k, b = int(blocks.shape[0]), int(blocks.shape[1]), int(blocks.shape[2])
        if k * b != out or b % 2:
            raise _oft_rows_error(entry, key, k, b, shape)
        r = _cayley(entry, out, device)
        merged = w
        for i in range(m):
            half = 2 ** i * (b // 2)
            if out % (2 * half):
                raise ValueError(f"{entry.file}: BOFT module '{entry.name}' stage {i} needs the {out} output rows of "
                                 f"'{key}' to split into groups of {2 * half} ('{_src(entry)}')")
            # rows (group, 2, half) -> (group, half, 2): interleave the two halves, then rotate b rows at a time
            x = merged.reshape(-1, 2, half, *shape[1:]).transpose(1, 2).reshape(k, b, *shape[1:])
            x = torch.einsum("kij,kj...->ki...", r[i], x)
            merged = x.reshape(-1, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    if entry.rescale is not None:
        rs = entry.rescale.to(device=device, dtype=torch.float32)
        if rs.numel() != out:
            raise ValueError(f"{entry.file}: '{entry.name}.rescale' has shape {tuple(rs.shape)} but model weight "
                             f"'{key}' has {out} output channels")
        merged = merged * rs.reshape(out, *[1] * (len(shape) - 1))
    return merged


def _ia3_delta(entry: Ia3Module, key: str, shape: tuple, w: torch.Tensor, device) -> torch.Tensor:
    v = entry.weight.to(device=device, dtype=torch.float32).reshape(-1)
    axis = 1 if entry.on_input else 0
    if len(shape) <= axis or v.numel() != shape[axis]:
        side = "input" if entry.on_input else "output"
        raise ValueError(f"{entry.file}: IA3 '{_src(entry)}' has {v.numel()} values but model weight '{key}' has "
                         f"{shape[axis] if len(shape) > axis else '?'} {side} channels (shape {tuple(shape)}); the "
                         f"adapter does not fit this model")
    view = [1] * len(shape)
    view[axis] = -1
    return w * v.reshape(view)


def base_delta(entry: Entry, key: str, shape: Sequence[int], strength: float, base_weight: torch.Tensor,
               device: torch.device | None = None) -> torch.Tensor:
    """``strength ·`` fp32 delta of a GLoRA, OFT/BOFT or IA3 entry against the base weight (module doc)."""
    shape = tuple(int(s) for s in shape)
    w = base_weight.to(device=device, dtype=torch.float32)
    if tuple(w.shape) != shape:
        raise _shape_error(entry, key, tuple(w.shape), shape)
    if len(shape) < 2 and not isinstance(entry, Ia3Module):
        raise _shape_error(entry, key, (), shape)
    if isinstance(entry, GloraModule):
        d = _glora_delta(entry, key, shape, w, device)
    elif isinstance(entry, OftModule):
        d = _oft_merged(entry, key, shape, w, device) - w
    elif isinstance(entry, Ia3Module):
        d = _ia3_delta(entry, key, shape, w, device)
    else:  # pragma: no cover
        raise ValueError(f"{entry.file}: base_delta does not handle {type(entry).__name__}")
    if tuple(d.shape) != shape:
        raise _shape_error(entry, key, tuple(d.shape), shape)
    return d.mul_(strength) if strength != 1.0 else d


def _out_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm per output row (over all dims but 0), shaped [out, 1, …]."""
    return w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))


def _in_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm per input column (over all dims but 1), shaped [1, in, 1, …]."""
    return (w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1))


def dora_delta(entry: Entry, key: str, shape: Sequence[int], strength: float, base_weight: torch.Tensor,
               device: torch.device | None = None, dora_mode: str = "comfyui") -> torch.Tensor:
    """DoRA delta ``strength·(W'' − W)`` of one entry against the base weight (formulas in the module doc).

    ``dora_mode`` selects the kohya/LyCORIS output-axis norm; PEFT magnitude entries ignore it.
    """
    if dora_mode not in ("comfyui", "lycoris"):
        raise ValueError(f"dora_mode must be 'comfyui' or 'lycoris', got {dora_mode!r}")
    w = base_weight.to(device=device, dtype=torch.float32)
    if tuple(w.shape) != tuple(shape):
        raise _shape_error(entry, key, tuple(w.shape), shape)
    w_calc = w + raw_delta(entry, key, shape, device)
    m_shape = peft_magnitude_shape(entry, key, shape) if _is_peft_dora(entry) else None
    ds = entry.dora_scale.to(device=device, dtype=torch.float32)
    eps = torch.finfo(torch.float32).eps
    if m_shape is not None:
        ds, norm = ds.reshape(m_shape), _out_norm(w_calc)
    elif ds.shape[0] == w_calc.shape[0]:
        norm = _out_norm(w if dora_mode == "comfyui" else w_calc)
    else:
        norm = _in_norm(w_calc)
    try:
        w_new = w_calc * (ds / (norm + eps))
    except RuntimeError as e:
        raise ValueError(f"{entry.file}: '{_dora_key(entry)}' shape {tuple(ds.shape)} does not broadcast against "
                         f"model weight '{key}' shape {tuple(shape)}") from e
    if w_new.shape != w.shape:
        raise _shape_error(entry, key, tuple(w_new.shape), shape)
    return (w_new - w).mul_(strength)


def key_delta(items: Sequence[tuple[Entry, float]], key: str, shape: Sequence[int],
              base_weight_fn: BaseWeightFn | None = None, device: torch.device | None = None,
              dora_mode: str = "comfyui", out: torch.Tensor | None = None) -> torch.Tensor:
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
        if isinstance(entry, LoraModule) and entry.dora_scale is None:
            if strength == 0.0:
                continue
            _check_lora_shape(entry, key, shape)
            b, a = lora_factors(entry, device)
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
        if isinstance(entry, BASE_DEPENDENT):
            if strength != 0.0:
                total += base_delta(entry, key, shape, strength, base_for(entry, entry.kind.upper()), device)
        elif entry.dora_scale is not None:
            w = base_for(entry, f"DoRA (has '{_dora_key(entry)}')")
            total += dora_delta(entry, key, shape, strength, w, device, dora_mode)
        elif strength != 0.0:
            total += raw_delta(entry, key, shape, device).mul_(strength)
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


def iter_deltas(entries: Sequence[tuple[Entry, float]], weight_shapes: dict[str, Sequence[int]],
                module_to_host: dict[str, str], *, base_weight_fn: BaseWeightFn | None = None,
                key_scale: KeyScaleFn | None = None, device: torch.device | None = None,
                dora_mode: str = "comfyui") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(host_key, fp32 delta)`` one key at a time (see ``compute_deltas``)."""
    groups = group_by_key(entries, module_to_host, key_scale)
    for key, items in groups.items():
        shape = weight_shapes.get(key)
        if shape is None:
            e = items[0][0]
            raise ValueError(f"{e.file}: module '{e.name}' maps to '{key}', which is not a weight of the model")
        yield key, key_delta(items, key, shape, base_weight_fn, device, dora_mode)


def compute_deltas(entries: Sequence[tuple[Entry, float]], weight_shapes: dict[str, Sequence[int]],
                   module_to_host: dict[str, str], *, base_weight_fn: BaseWeightFn | None = None,
                   key_scale: KeyScaleFn | None = None, device: torch.device | None = None,
                   dora_mode: str = "comfyui") -> dict[str, torch.Tensor]:
    """Exact fp32 ΔW per host key for ``(entry, strength)`` pairs.

    Args:
        entries: adapter entries with their strengths (any mix of adapters/types).
        weight_shapes: host key -> weight shape (bias keys needed for ``.diff_b``).
        module_to_host: entry.name -> host weight key (``lora.keys`` result).
        base_weight_fn: host key -> base weight tensor; required only for DoRA entries.
        key_scale: optional (entry, host_key) -> multiplier (block weights, LiNeS).
        device: compute device (default: the factors' device, i.e. CPU).
        dora_mode: "comfyui" (bit-for-bit semantics of ComfyUI 0.3.75) or "lycoris"; applies to kohya/LyCORIS
            ``dora_scale`` entries only (PEFT ``lora_magnitude_vector`` entries always use PEFT's norm).

    Raises:
        ValueError: unmapped module, unknown host key, or shape mismatch (names file, key, shapes).
    """
    return dict(iter_deltas(entries, weight_shapes, module_to_host, base_weight_fn=base_weight_fn,
                            key_scale=key_scale, device=device, dora_mode=dora_mode))


def apply_delta(base_weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``round_dtype(fp32(base) + fp32(delta))``: one rounding into ``dtype`` (default: base dtype)."""
    if tuple(base_weight.shape) != tuple(delta.shape):
        raise ValueError(f"apply_delta: delta shape {tuple(delta.shape)} != weight shape {tuple(base_weight.shape)}")
    out_dtype = dtype or base_weight.dtype
    w = base_weight.to(device=delta.device, dtype=torch.float32)
    return (w + delta.to(torch.float32)).to(out_dtype)
