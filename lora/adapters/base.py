"""What every adapter kind shares: the entry's common fields, the parse context, and the delta's shape checks.

An adapter kind (one module of this package) gives:

* an entry dataclass (a ``ModuleEntry`` subclass) holding its factors, with ``make_delta`` (the fp32 delta at full
  strength before the entry's scale) and the class facts ``base_dependent`` (the delta needs the base weight),
  ``takes_dora`` (a DoRA magnitude may ride on it), ``gemm`` (plain low-rank factors the fuser concatenates into
  one GEMM, with ``factors``) and ``target`` ("weight", or "bias" for ``<module>.bias``);
* ``KIND``: an ``AdapterKind`` with its tensor-name suffixes and its ``parse`` (one module's tensors -> entries).

``lora.adapters.ADAPTERS`` lists the kinds; ``lora.formats`` reads files and groups tensors by module, and
``lora.fuse`` combines the deltas (one GEMM for plain LoRAs, DoRA) without knowing any kind by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar
from collections.abc import Callable, Sequence

import torch

DORA_NORM_PEFT = "peft"
"""``ModuleEntry.dora_norm`` of a PEFT/diffusers ``lora_magnitude_vector`` entry (combined-weight norm)."""

META = torch.device("meta")


@dataclass(frozen=True)
class Suffix:
    """A tensor-name suffix an adapter kind reads: ``<module><suffix>`` is the tensor of ``role``.

    ``style`` names the key convention (kohya, peft, ...); ``needs`` is a sibling suffix that must exist for the
    name to count (IA3's bare ``.weight`` only next to ``.on_input``); ``module_tail`` is appended to the module
    name (LightX2V writes Wan's ``blocks.N.modulation`` difference as ``blocks.N.diff_m``)."""

    suffix: str
    role: str
    style: str
    needs: str = ""
    module_tail: str = ""


@dataclass
class ModuleEntry:
    """Common fields of one adapter module (one target weight).

    Attributes:
        name: the module prefix as written in the file (e.g. ``lora_unet_..._to_q``).
        file: path of the file it came from (for error messages).
        alpha: alpha value, or None when the file carried none.
        alpha_source: "tensor", "ss_network_alpha", "ss_network_args.conv_alpha",
            "lora_adapter_metadata", "rank" (defaulted) or "n/a".
        dora_scale: DoRA magnitude tensor (as stored in the file) or None.
        dora_norm: how the fuser normalises ``dora_scale``: "" for kohya/LyCORIS ``dora_scale`` (axis from its
            shape); ``DORA_NORM_PEFT`` ("peft") for a PEFT/diffusers ``lora_magnitude_vector``: the
            per-output-channel norm of the combined weight W + ΔW (see ``lora.fuse``).
        style: key style ("kohya", "peft", "diffusers", "loha", "lokr", "full", ...).
        source_keys: the tensor names consumed for this entry.
        rslora: PEFT rank-stabilised scaling (scale = alpha / sqrt(rank)); from ``lora_adapter_metadata``.
    """

    name: str
    file: str
    alpha: float | None = None
    alpha_source: str = "rank"
    dora_scale: torch.Tensor | None = None
    dora_norm: str = ""
    style: str = ""
    source_keys: list[str] = field(default_factory=list)
    rslora: bool = False

    kind: ClassVar[str] = "base"
    base_dependent: ClassVar[bool] = False
    takes_dora: ClassVar[bool] = False
    gemm: ClassVar[bool] = False
    target: ClassVar[str] = "weight"

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with ``rslora`` (1.0 when alpha or rank is undefined)."""
        r = self.rank
        if r is None or self.alpha is None:
            return 1.0
        return float(self.alpha) / (math.sqrt(r) if self.rslora else float(r))

    def delta_scale(self, shape: tuple[int, ...]) -> float:
        """The multiplier ``delta`` applies to ``make_delta`` (``scale``; GLoRA reads its rank from ``shape``)."""
        return self.scale

    def make_delta(self, key: str, shape: tuple[int, ...], device: torch.device | None,
                   base: torch.Tensor | None) -> torch.Tensor:
        """fp32 delta before ``delta_scale``, ``shape[0]`` rows (``base``: fp32 base weight, base-dependent only)."""
        raise NotImplementedError(type(self).__name__)

    def factors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (B [out, r], A [r, in·k·k]) with ΔW_flat = B @ A (``gemm`` kinds only)."""
        raise NotImplementedError(type(self).__name__)

    def delta(self, key: str, shape: Sequence[int], device: torch.device | None = None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """The entry's fp32 delta at strength 1 (its scale applied), shaped like model weight ``key``.

        Raises ValueError naming the file, the tensor and both shapes when it does not fit ``shape``, or when a
        base-dependent kind gets no ``base``."""
        shape = tuple(int(s) for s in shape)
        w = None
        if self.base_dependent:
            if base is None:
                raise ValueError(f"{self.file}: module '{self.name}' is {self.kind.upper()}, whose delta depends on "
                                 f"the base weight of '{key}'; pass the base weight")
            w = base.to(device=device, dtype=torch.float32)
            if tuple(w.shape) != shape:
                raise shape_error(self, key, tuple(w.shape), shape)
        d = self.make_delta(key, shape, device, w)
        if d.numel() != math.prod(shape) or (shape and d.shape[0] != shape[0]):
            raise shape_error(self, key, tuple(d.shape), shape)
        d = d.reshape(shape)
        s = self.delta_scale(shape)
        return d.mul_(s) if s != 1.0 else d

    def check_shape(self, key: str, shape: Sequence[int]) -> None:
        """Raise the shape errors ``delta`` would raise, computing on the meta device (no data touched)."""
        self.delta(key, shape, META, torch.empty(tuple(shape), device=META) if self.base_dependent else None)


def src(entry: ModuleEntry) -> str:
    """The file's first tensor name of ``entry`` (for error messages)."""
    return entry.source_keys[0] if entry.source_keys else entry.name


def shape_error(entry: ModuleEntry, key: str, got: Sequence[int], want: Sequence[int]) -> ValueError:
    return ValueError(f"{entry.file}: '{src(entry)}' gives a delta of shape {tuple(got)} but model weight '{key}' has "
                      f"shape {tuple(want)}; the adapter does not fit this model (wrong base model?)")


def fp32(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild ``einsum("ijkl,jr,ip->prkl", t, wb, wa)`` (a permuted view)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


COMMON_SUFFIXES = (
    Suffix(".alpha", "alpha", ""),
    Suffix(".dora_scale", "dora_scale", ""),
    Suffix(".lora_magnitude_vector", "magnitude", "peft"),
    Suffix(".lora_magnitude_vector.weight", "magnitude", "peft"),
    Suffix(".lora_magnitude_vector.default.weight", "magnitude", "peft"),
    Suffix(".magnitude", "magnitude", "peft"),  # ai-toolkit DoRA (PEFT convention)
)
"""Suffixes read for every kind (``ModuleTensors``): the ``.alpha`` tensor and the DoRA magnitudes."""
COMMON_ROLES = frozenset(s.role for s in COMMON_SUFFIXES)


class ModuleTensors:
    """One module's tensors in a file, as a kind's ``parse`` reads them.

    Args:
        path: the file (for error messages).
        module: the module prefix.
        slot: role -> (tensor name, tensor, key style).
        resolve: (module, is a k×k conv) -> (alpha or None, its source): the file header's alpha
            (``lora.formats``); used when the module has no ``.alpha`` tensor.
        rslora: the header asks for rank-stabilised scaling (applies to header alphas).
    """

    def __init__(self, path: str, module: str, slot: dict[str, tuple[str, torch.Tensor, str]],
                 resolve: Callable[[str, bool], tuple[float | None, str]], rslora: bool = False):
        self.path, self.module, self.slot, self.resolve, self.rslora = path, module, slot, resolve, rslora
        self.keys = {role: v[0] for role, v in slot.items()}
        self.alpha: float | None = None
        self.alpha_source = "rank"
        a = self.get("alpha")
        if a is not None:
            if a.numel() != 1:
                raise self.error(f"'{self.keys['alpha']}' must be a scalar, got shape {tuple(a.shape)}")
            self.alpha, self.alpha_source = float(a.reshape(()).item()), "tensor"
        self.dora, self.dora_norm = self._dora()

    def __contains__(self, role: str) -> bool:
        return role in self.slot

    def get(self, role: str) -> torch.Tensor | None:
        v = self.slot.get(role)
        return None if v is None else v[1]

    def style(self, role: str) -> str:
        return self.slot[role][2]

    def error(self, msg: str) -> ValueError:
        return ValueError(f"{self.path}: {msg}")

    def _dora(self) -> tuple[torch.Tensor | None, str]:
        """(DoRA magnitude or None, ``dora_norm``): kohya ``dora_scale`` or PEFT ``lora_magnitude_vector``."""
        if "magnitude" not in self.slot:
            return self.get("dora_scale"), ""
        if "dora_scale" in self.slot:
            raise self.error(f"module '{self.module}' has two DoRA magnitudes ('{self.keys['dora_scale']}' and "
                             f"'{self.keys['magnitude']}'); the file mixes key styles")
        if "up" not in self.slot and "down" not in self.slot:
            raise self.error(f"'{self.keys['magnitude']}' (PEFT DoRA magnitude) has no LoRA up/down factors for "
                             f"module '{self.module}'")
        return self.get("magnitude"), DORA_NORM_PEFT

    def fields(self, style: str, roles: Sequence[str], kxk: bool = False, alpha: bool = True) -> dict:
        """The ``ModuleEntry`` fields of an entry made of ``roles``: alpha (the tensor, else the header's; with
        ``alpha=False`` none, "n/a"), DoRA magnitude, style and source keys."""
        a, source = (self.alpha, self.alpha_source) if alpha else (None, "n/a")
        if alpha and a is None:
            a, source = self.resolve(self.module, kxk)
        keys = [self.keys[r] for r in roles if r in self.keys]
        keys += [self.keys[r] for r in ("alpha", "dora_scale", "magnitude") if r in self.keys]
        return dict(name=self.module, file=self.path, alpha=a, alpha_source=source, dora_scale=self.dora,
                    dora_norm=self.dora_norm, style=style, source_keys=keys)


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind in the registry: its tensor-name suffixes and its parse.

    ``parse(tensors)`` returns the module's entries of this kind ([] when none of its trigger roles is there) and
    raises ValueError (naming file and tensor) for an incomplete or malformed set."""

    name: str
    suffixes: tuple[Suffix, ...]
    parse: Callable[[ModuleTensors], list[ModuleEntry]]

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(s.role for s in self.suffixes)
