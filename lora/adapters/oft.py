"""OFT / BOFT (LyCORIS ``diag-oft`` / ``boft``, sd-scripts ``networks/oft.py``): W' = rescale ⊙ (R-rotated W),
ΔW = W' − W, computed against the base weight W.

    OFT    Q = B − Bᵀ per block; if alpha > 0 and ‖Q‖ > alpha·out: Q ← Q·alpha·out/‖Q‖
           R = (I + Q)(I − Q)⁻¹;  W' = rescale ⊙ (Rᵀ applied per block of n output rows)
    BOFT   the same Cayley R per block and stage; stage i permutes the output rows in groups of 2·k
           (k = 2ⁱ·b/2), applies R block-wise, permutes back

Tensor names: ``<m>.oft_blocks`` ([blocks, n, n]; BOFT [stages, blocks, b, b]) (+ ``<m>.rescale``); the module's
``alpha`` is the norm constraint, not a LoRA scale. The constraint threshold alpha·out_dim is the trainers'
(LyCORIS, sd-scripts); ComfyUI 0.3.75 clamps at alpha, ignores OFT's ``rescale`` and applies the OFT/BOFT strength
twice. At strength 1, with no clamp active and (for OFT) no rescale, the results agree with ComfyUI. For BOFT with
several stages and strength s ≠ 1, LyCORIS interpolates every stage (R·s + (1 − s)·I); here s scales the full
delta, like every other adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix, fp32, shape_error, src


@dataclass
class OftModule(ModuleEntry):
    """OFT / BOFT: ``blocks`` [k, n, n] (OFT) or [m, k, b, b] (BOFT, m butterfly stages). Needs the base weight."""

    blocks: torch.Tensor = None  # type: ignore[assignment]
    rescale: torch.Tensor | None = None
    base_dependent = True

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "boft" if self.blocks.ndim == 4 else "oft"

    @property
    def scale(self) -> float:
        return 1.0

    def cayley(self, out_dim: int, device) -> torch.Tensor:
        """Per-block rotations R = (I + Q)(I − Q)⁻¹ of the skew part Q, norm-clamped to alpha·out_dim."""
        b = fp32(self.blocks, device)
        q = b - b.transpose(-1, -2)
        limit = float(self.alpha or 0.0) * out_dim
        if limit > 0:
            norm = torch.linalg.vector_norm(q) + 1e-8
            q = torch.where(norm > limit, q * (limit / norm), q)
        eye = torch.eye(b.shape[-1], device=device, dtype=torch.float32)
        return (eye + q) @ torch.linalg.inv(eye - q)

    def rows_error(self, key: str, k: int, n: int, shape: tuple) -> ValueError:
        return ValueError(f"{self.file}: '{src(self)}' holds {k} blocks of {n} rows ({k * n} output channels) but "
                          f"model weight '{key}' has shape {tuple(shape)}; the adapter does not fit this model "
                          f"(wrong base model?)")

    def rotated(self, key: str, shape: tuple, w: torch.Tensor, device) -> torch.Tensor:
        """R applied to the output rows of ``w`` (OFT: per block; BOFT: stage by stage through the butterfly)."""
        out, blocks = shape[0], self.blocks
        if blocks.ndim == 3:
            k, n = int(blocks.shape[0]), int(blocks.shape[1])
            if k * n != out:
                raise self.rows_error(key, k, n, shape)
            r = self.cayley(out, device)
            return torch.einsum("knm,kn...->km...", r, w.reshape(k, n, *shape[1:])).reshape(shape)
        m, k, b = int(blocks.shape[0]), int(blocks.shape[1]), int(blocks.shape[2])
        if k * b != out or b % 2:
            raise self.rows_error(key, k, b, shape)
        r = self.cayley(out, device)
        merged = w
        for i in range(m):
            half = 2 ** i * (b // 2)
            if out % (2 * half):
                raise ValueError(f"{self.file}: BOFT module '{self.name}' stage {i} needs the {out} output rows of "
                                 f"'{key}' to split into groups of {2 * half} ('{src(self)}')")
            # rows (group, 2, half) -> (group, half, 2): interleave the two halves, then rotate b rows at a time
            x = merged.reshape(-1, 2, half, *shape[1:]).transpose(1, 2).reshape(k, b, *shape[1:])
            x = torch.einsum("kij,kj...->ki...", r[i], x)
            merged = x.reshape(-1, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)
        return merged

    def make_delta(self, key, shape, device, base) -> torch.Tensor:
        if len(shape) < 2:
            raise shape_error(self, key, (), shape)
        merged = self.rotated(key, shape, base, device)
        if self.rescale is not None:
            rs = fp32(self.rescale, device)
            if rs.numel() != shape[0]:
                raise ValueError(f"{self.file}: '{self.name}.rescale' has shape {tuple(rs.shape)} but model weight "
                                 f"'{key}' has {shape[0]} output channels")
            merged = merged * rs.reshape(shape[0], *[1] * (len(shape) - 1))
        return merged - base


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    if "oft_blocks" not in t:
        return []
    blocks = t.get("oft_blocks")
    if blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
        raise t.error(f"'{t.keys['oft_blocks']}' has shape {tuple(blocks.shape)}; OFT blocks are [blocks, n, n] and "
                      f"BOFT blocks [stages, blocks, b, b]")
    return [OftModule(blocks=blocks, rescale=t.get("oft_rescale"), **t.fields("oft", ["oft_blocks", "oft_rescale"]))]


KIND = AdapterKind("OFT/BOFT", (Suffix(".oft_blocks", "oft_blocks", "oft"), Suffix(".rescale", "oft_rescale", "oft")),
                   parse)
