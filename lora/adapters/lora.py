"""Plain LoRA / LoCon (with LoCon's Tucker mid): ΔW = scale · up @ [mid ∘] down.

Tensor names (``<m>`` the module prefix): kohya ``<m>.lora_up.weight`` + ``<m>.lora_down.weight`` (+
``<m>.lora_mid.weight`` for LoCon Tucker), PEFT ``<m>.lora_B.weight`` + ``<m>.lora_A.weight`` (also
``.lora_B.default.weight``), diffusers ``<m>.lora.up.weight`` + ``<m>.lora.down.weight``, old diffusers
``<m>_lora.up.weight``, transformers ``<m>.lora_linear_layer.up.weight``, Mochi ``<m>.lora_B`` + ``<m>.lora_A``.
PEFT's ``lora_bias`` (``<m>.lora_B.bias``, which diffusers' Wan conversion writes for a ``diff_b``) adds
scale · bias to the module's bias, as PEFT merges it.

Shapes: linear down [r, in], up [out, r]; kohya conv k×k down [r, in, kh, kw], up [out, r, 1, 1] (ΔW_flat
[out, in·kh·kw]); LoCon Tucker down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1] (A = mid ∘ down first).
Alpha defaults to the rank (scale 1); PEFT's rsLoRA scales by alpha / sqrt(rank) (header alphas only). The fuser
concatenates every plain LoRA on a weight into one GEMM (``lora.fuse``); a DoRA magnitude may ride on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import torch

from .base import AdapterKind, ModuleEntry, ModuleTensors, Suffix, fp32, shape_error, src
from .diff import BiasDiffModule


@dataclass
class LoraModule(ModuleEntry):
    """Plain LoRA / LoCon: ΔW = scale · up @ [mid ∘] down."""

    down: torch.Tensor = None  # type: ignore[assignment]
    up: torch.Tensor = None  # type: ignore[assignment]
    mid: torch.Tensor | None = None
    kind = "lora"
    takes_dora = True
    gemm = True

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def factors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (B [out, r], A [r, in·k·k]) with ΔW_flat = B @ A (scale not applied)."""
        up, down = fp32(self.up, device), fp32(self.down, device)
        if self.mid is not None:
            # A[a, i, k, l] = Σ_b mid[a, b, k, l] · down[b, i]
            a = torch.einsum("abkl,bi->aikl", fp32(self.mid, device), down.reshape(down.shape[0], -1))
            return up.reshape(up.shape[0], -1), a.reshape(a.shape[0], -1)
        return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)

    def factor_shape(self) -> tuple[int, int, int, int]:
        """Shapes of ``factors()`` from tensor shapes alone: (B rows, B cols, A rows, A cols)."""
        up, down, mid = self.up, self.down, self.mid
        b_cols = math.prod(up.shape[1:])
        if mid is None:
            return up.shape[0], b_cols, down.shape[0], math.prod(down.shape[1:])
        if mid.ndim != 4 or mid.shape[1] != down.shape[0]:
            raise ValueError(f"{self.file}: '{src(self)}' Tucker mid {tuple(mid.shape)} does not fit down "
                             f"{tuple(down.shape)}")
        return up.shape[0], b_cols, mid.shape[0], math.prod(down.shape[1:]) * math.prod(mid.shape[2:])

    def check_shape(self, key: str, shape: Sequence[int]) -> None:
        """ValueError (file, key, shapes) unless ``factors()`` multiply into a delta of ``shape`` (shapes only)."""
        b_rows, b_cols, a_rows, a_cols = self.factor_shape()
        if b_cols != a_rows:
            raise ValueError(f"{self.file}: module '{self.name}' rank mismatch: up {tuple(self.up.shape)} "
                             f"vs down {tuple(self.down.shape)} ('{src(self)}')")
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        if len(shape) < 2 or b_rows != shape[0] or a_cols != cols:
            raise shape_error(self, key, (b_rows, a_cols), shape)

    def make_delta(self, key, shape, device, base) -> torch.Tensor:
        self.check_shape(key, shape)
        b, a = self.factors(device)
        return b @ a


@dataclass
class LoraBiasModule(BiasDiffModule):
    """PEFT ``lora_bias``: Δb = scale · lora_B.bias (scale = alpha / rank of the module's LoRA)."""

    lora_rank: int = 1
    kind = "lora_bias"

    @property
    def rank(self) -> int:
        return self.lora_rank


def parse(t: ModuleTensors) -> list[ModuleEntry]:
    if "up" not in t and "down" not in t:
        if "lora_bias" in t:
            raise t.error(f"'{t.keys['lora_bias']}' has no LoRA factors for module '{t.module}'")
        return []
    if "up" not in t or "down" not in t:
        have = t.keys.get("up") or t.keys.get("down")
        raise t.error(f"'{have}' has no matching {'down' if 'up' in t else 'up'} factor; the file is incomplete")
    up, down, mid = t.get("up"), t.get("down"), t.get("mid")
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
        raise t.error(f"module '{t.module}' rank mismatch: up {tuple(up.shape)} vs down {tuple(down.shape)} "
                      f"('{t.keys['up']}')")
    kxk = (mid is not None and mid.ndim == 4 and mid.shape[-1] > 1) or (down.ndim == 4 and down.shape[-1] > 1)
    f = t.fields(t.style("up"), ["up", "down", "mid"], kxk)
    if f["alpha"] is None:
        f["alpha"] = float(down.shape[0])
    f["rslora"] = f["alpha_source"] == "lora_adapter_metadata" and t.rslora
    out: list[ModuleEntry] = [LoraModule(down=down, up=up, mid=mid, **f)]
    if "lora_bias" in t:
        out.append(LoraBiasModule(name=t.module, file=t.path, alpha=f["alpha"], alpha_source=f["alpha_source"],
                                  style="peft", source_keys=[t.keys["lora_bias"]], rslora=f["rslora"],
                                  diff=t.get("lora_bias"), lora_rank=int(down.shape[0])))
    return out


def _pair(up: str, down: str, style: str) -> tuple[Suffix, Suffix]:
    return Suffix(up, "up", style), Suffix(down, "down", style)


KIND = AdapterKind("LoRA/LoCon", (
    *_pair(".lora_up.weight", ".lora_down.weight", "kohya"), Suffix(".lora_mid.weight", "mid", "kohya"),
    *_pair(".lora_B.default.weight", ".lora_A.default.weight", "peft"),
    *_pair(".lora_B.weight", ".lora_A.weight", "peft"),
    *_pair(".lora.up.weight", ".lora.down.weight", "diffusers"),
    *_pair("_lora.up.weight", "_lora.down.weight", "diffusers_old"),
    *_pair(".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", "transformers"),
    *_pair(".lora_B", ".lora_A", "mochi"),
    Suffix(".lora_B.bias", "lora_bias", "peft"),
), parse)
