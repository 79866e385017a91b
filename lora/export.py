"""Export a merged delta set as a kohya LoRA by randomized low-rank SVD.

One algorithm: per host key, M = ΔW reshaped to [out, in·kh·kw]; a seeded
randomized SVD (Halko, Martinsson & Tropp 2011: Gaussian sketch of k + 8
columns, 2 power iterations with QR re-orthonormalisation, exact SVD of the
small projected matrix) gives M ≈ U_k Σ_k V_kᵀ. The factors are split
balanced, up = U_k √Σ_k and down = √Σ_k V_kᵀ, written as
``lora_unet_<model path with _>.lora_up.weight / .lora_down.weight`` -- the kohya name core ComfyUI maps for every
family, UNet or DiT (musubi-tuner's and sd-scripts' spelling for Wan / Flux) -- (other keys, e.g. text-encoder
weights, get their names from ``lora_names``; conv:
down [r, in, kh, kw], up [out, r, 1, 1]; 3-D conv down [r, in, kt, kh, kw], up [out, r]) with ``.alpha`` = r, so
ComfyUI's scale alpha/rank is 1. 1-D deltas (biases, norms) are written exactly as
``.diff_b`` / ``.diff``; so is a parameter that is not a ``.weight`` (Wan's ``blocks.N.modulation``), under its own
name ``diffusion_model.<path>.diff``, which is how the host's key map names such parameters.

Rank choice: a fixed ``rank`` (capped at min(out, in·kh·kw)), or an
``energy`` threshold e ∈ (0, 1]: the smallest r with
sqrt(Σᵢ≤r σᵢ² / ‖M‖_F²) ≥ e (kohya ``sv_fro``), searched within ``max_rank``.
When k + oversample ≥ min(m, n) the exact SVD is used (it is cheaper).

The report gives each key's relative Frobenius error ‖M − up·down‖_F / ‖M‖_F
measured on the factors as stored (after the cast to ``dtype``) and the
overall error sqrt(Σ‖M − M̂‖²) / sqrt(Σ‖M‖²). ``full_svd_export`` is the same
with ``torch.linalg.svd`` (benchmark reference).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping

import torch

from .seeds import seed_for

LOG = logging.getLogger("fewstep")

OVERSAMPLE = 8
POWER_ITERS = 2


@dataclass
class KeyReport:
    """Per-key export result."""

    key: str
    lora_name: str
    rank: int
    rel_error: float
    energy: float  # retained Frobenius energy fraction sqrt(Σσ²[:r]/‖M‖²) (1.0 for exact 1-D diffs)
    shape: tuple[int, ...]


@dataclass
class ExportReport:
    """Whole-export result: per-key reports and the overall relative Frobenius error."""

    keys: list[KeyReport] = field(default_factory=list)
    skipped_zero: list[str] = field(default_factory=list)
    method: str = "randomized"
    _err2: float = 0.0
    _ref2: float = 0.0

    @property
    def overall_rel_error(self) -> float:
        return math.sqrt(self._err2 / self._ref2) if self._ref2 > 0 else 0.0

    def worst(self, n: int = 5) -> list[KeyReport]:
        return sorted(self.keys, key=lambda r: r.rel_error, reverse=True)[:n]


def randomized_svd(m: torch.Tensor, k: int, *, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS,
                   seed: int = 0, key: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded Halko randomized SVD of a 2-D fp32 matrix: returns (U [m, k], S [k], Vh [k, n]).

    Falls back to the exact SVD when k + oversample ≥ min(m, n).
    """
    rows, cols = m.shape
    kmax = min(rows, cols)
    k = max(1, min(int(k), kmax))
    l = k + oversample
    if l >= kmax:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    g = torch.Generator(device="cpu")
    g.manual_seed(seed_for(seed, key))
    omega = torch.randn(cols, l, generator=g, dtype=torch.float32).to(m.device)
    q, _ = torch.linalg.qr(m @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ z)
    b = q.T @ m
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[:, :k], s[:k], vh[:k]


def lora_name_for(host_key: str) -> str:
    """kohya module name for a host key: ``diffusion_model.input_blocks.1.1.proj_in.weight`` ->
    ``lora_unet_input_blocks_1_1_proj_in``."""
    k = host_key
    for p in ("model.diffusion_model.", "diffusion_model."):
        if k.startswith(p):
            k = k[len(p):]
            break
    for s in (".weight", ".bias"):
        if k.endswith(s):
            k = k[: -len(s)]
            break
    return "lora_unet_" + k.replace(".", "_")


def _pick_energy_rank(s: torch.Tensor, total2: float, energy: float) -> tuple[int, float]:
    if total2 <= 0:
        return 1, 1.0
    cum = torch.cumsum(s.double() ** 2, 0) / total2
    target = energy * energy
    hit = torch.nonzero(cum >= target - 1e-12)
    r = int(hit[0]) + 1 if hit.numel() else int(s.numel())
    return r, float(math.sqrt(min(1.0, float(cum[r - 1]))))


def _export(deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], rank: int | None,
            energy: float | None, max_rank: int, seed: int, dtype: torch.dtype, method: str,
            lora_names: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], ExportReport]:
    if (rank is None) == (energy is None):
        raise ValueError("export needs exactly one of rank=<int> or energy=<fraction in (0, 1]>")
    if rank is not None and int(rank) < 1:
        raise ValueError(f"export rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"export energy threshold must be in (0, 1], got {energy}")
    items = deltas.items() if isinstance(deltas, Mapping) else deltas
    sd: dict[str, torch.Tensor] = {}
    rep = ExportReport(method=method)
    for key, delta in items:
        d = delta.to(torch.float32)
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"export: delta for '{key}' contains NaN/Inf")
        name = lora_names[key] if lora_names and key in lora_names else lora_name_for(key)
        plain = not key.endswith((".weight", ".bias")) and not (lora_names and key in lora_names)
        if plain:  # a parameter that is not a weight (Wan's modulation): the host names it by its key
            name = key
        ref2 = float(d.double().pow(2).sum())
        if ref2 == 0.0:
            rep.skipped_zero.append(key)
            continue
        if d.ndim <= 1 or plain:
            suffix = ".diff_b" if key.endswith(".bias") else ".diff"
            stored = d.to(dtype)
            sd[name + suffix] = stored.contiguous().cpu()
            err2 = float((stored.to(torch.float32) - d).double().pow(2).sum())
            rep.keys.append(KeyReport(key, name, 0, math.sqrt(err2 / ref2), 1.0, tuple(d.shape)))
            rep._err2 += err2
            rep._ref2 += ref2
            continue
        m = d.reshape(d.shape[0], -1)
        kmax = min(m.shape)
        if rank is not None:
            k = min(int(rank), kmax)
            if method == "full":
                u, s, vh = torch.linalg.svd(m, full_matrices=False)
                u, s, vh = u[:, :k], s[:k], vh[:k]
            else:
                u, s, vh = randomized_svd(m, k, seed=seed, key=key)
            r = k
            kept = float(s.double().pow(2).sum()) / ref2
            e = math.sqrt(min(1.0, kept))
        else:
            cap = min(int(max_rank), kmax)
            if method == "full":
                u, s, vh = torch.linalg.svd(m, full_matrices=False)
                u, s, vh = u[:, :cap], s[:cap], vh[:cap]
            else:
                u, s, vh = randomized_svd(m, cap, seed=seed, key=key)
            r, e = _pick_energy_rank(s, ref2, float(energy))
            if e < float(energy) - 1e-9:
                LOG.warning("export: '%s' reaches only %.4f energy at max_rank=%d (asked %.4f)", key, e, cap,
                            float(energy))
            u, s, vh = u[:, :r], s[:r], vh[:r]
        root = s.clamp(min=0).sqrt()
        up = (u * root).to(dtype)
        down = (root[:, None] * vh).to(dtype)
        approx = up.to(torch.float32) @ down.to(torch.float32)
        err2 = float((approx - m).double().pow(2).sum())
        if d.ndim == 4:
            up_s = up.reshape(d.shape[0], r, 1, 1)
            down_s = down.reshape(r, *d.shape[1:])
        else:
            up_s, down_s = up, down.reshape(r, *d.shape[1:])
        sd[name + ".lora_up.weight"] = up_s.contiguous().cpu()
        sd[name + ".lora_down.weight"] = down_s.contiguous().cpu()
        sd[name + ".alpha"] = torch.tensor(float(r), dtype=torch.float32)
        rep.keys.append(KeyReport(key, name, r, math.sqrt(err2 / ref2), e, tuple(d.shape)))
        rep._err2 += err2
        rep._ref2 += ref2
    return sd, rep


def export_lora(deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                rank: int | None = None, energy: float | None = None, max_rank: int = 256, seed: int = 0,
                dtype: torch.dtype = torch.float16, lora_names: Mapping[str, str] | None = None
                ) -> tuple[dict[str, torch.Tensor], ExportReport]:
    """Randomized-SVD export of host-key deltas to a kohya LoRA state dict (see module doc).

    Args:
        deltas: host key -> fp32 delta (a dict or an iterator of (key, delta) pairs, one key at a time).
        rank: fixed rank, or
        energy: Frobenius energy threshold (exactly one of rank/energy).
        max_rank: rank cap for energy mode.
        seed: sketch seed (per key: sha256(seed, key)).
        dtype: stored factor dtype (errors are measured after this cast).
        lora_names: key -> LoRA module name for keys that are not UNet keys (e.g. ``lora_te_...`` for text-encoder
            weights); UNet keys default to ``lora_name_for``.
    """
    return _export(deltas, rank, energy, max_rank, seed, dtype, "randomized", lora_names)


def full_svd_export(deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                    rank: int | None = None, energy: float | None = None, max_rank: int = 256,
                    dtype: torch.dtype = torch.float16, lora_names: Mapping[str, str] | None = None
                    ) -> tuple[dict[str, torch.Tensor], ExportReport]:
    """Same as ``export_lora`` with the exact ``torch.linalg.svd`` (reference / benchmark)."""
    return _export(deltas, rank, energy, max_rank, 0, dtype, "full", lora_names)


def save_lora(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], report: ExportReport | None = None,
              metadata: dict[str, str] | None = None) -> None:
    """Write the exported state dict as ``.safetensors`` with minimal kohya metadata."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"{path}: exported LoRAs are written as .safetensors only")
    from safetensors.torch import save_file

    meta = {"ss_network_module": "networks.lora"}
    if report is not None and report.keys:
        ranks = sorted({k.rank for k in report.keys if k.rank > 0})
        if len(ranks) == 1:
            meta["ss_network_dim"] = meta["ss_network_alpha"] = str(ranks[0])
        meta["fewstep_export"] = json.dumps({"method": report.method,
                                             "overall_rel_error": round(report.overall_rel_error, 6)})
    meta.update(metadata or {})
    save_file(state_dict, path, metadata=meta)
