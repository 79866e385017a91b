"""Block weights, LiNeS depth scaling, and linear/TIES/DARE merging of full per-key deltas.

Block slots (sd-scripts ``svd_merge_lora.get_lbw_block_index`` / LoRA-Block-Weight)::

    26-slot grid: BASE, IN00..IN11, MID, OUT00..OUT11
    SD1.5 17: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    SD1.5 26: the full grid
    SDXL  12: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05
    SDXL  20: BASE, IN00..IN08, MID, OUT00..OUT08

``block_of`` works on LDM names: ``input_blocks.N`` -> INnn (``input_blocks.0``,
conv_in, is IN00 as in LoRA-Block-Weight), ``middle_block`` -> MID, ``output_blocks.N``
-> OUTnn. UNet weights outside the block stack follow sd-scripts'
``get_lbw_block_index``: on SDXL time_embed/label_emb -> IN00 and out -> OUT09 (a
slot no SDXL vector lists, so weight 1); on SD1.x/2.x they have no slot (weight 1,
as in sd-scripts and LoRA-Block-Weight). BASE is the text encoders' slot only.
As in sd-scripts, a slot that the chosen vector does not list keeps weight 1.0
(e.g. IN00/IN03/OUT00 with a 17-value vector; LoRA-Block-Weight zeroes those).

Presets (LBW names; LBW defines them for the SD1.5 17-slot vector, reproduced
exactly here; other layouts use the same region rule, BASE = 1 except NONE):
ALL, NONE, ALL0.5, INS (IN00-04; SDXL IN00-05), IND (IN05-11; SDXL IN06-08),
INALL, MIDD (IND + MID + OUTD), OUTD (OUT00-06; SDXL OUT00-02), OUTS
(OUT07-11; SDXL OUT03-08), OUTALL, MIDALL (MID only).

LiNeS: depth order IN00..INmax -> MID -> OUT00..OUTmax, l = 1..L (SD1.5 L = 25,
SDXL L = 19); λ(l) = α + β·(l−1)/(L−1). Weights outside the block stack
(time_embed, label_emb, out) get α, as the paper does for embeddings/heads.

Merge modes act on the FULL per-key delta of each style adapter; the
acceleration adapter is never merged, it is added linearly at its strength:

* linear: Σ τᵢ (exact).
* ties: trim each τᵢ (strength already applied) to its top ``int(density·n)`` entries by |x| (per
  key, as PEFT and mergekit do), elect γ = sgn(Σ τ̂ᵢ) with a zero sum electing +1 (PEFT),
  disjoint mean over entries whose sign equals γ (zeros excluded).
* dare: τ̃ᵢ = mᵢ ⊙ τᵢ / (1−p), mᵢ ~ Bernoulli(1−p) from a CPU torch.Generator
  seeded by sha256(seed, key, i): deterministic and independent of key order.
* dare_ties: DARE drop/rescale, then TIES elect + disjoint mean (no magnitude trim:
  ``density`` is not used, as in PEFT's ``dare_ties`` where the random drop is the pruning).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from collections.abc import Iterator, Sequence

import torch

from .formats import Entry
from .fuse import BaseWeightFn, KeyScaleFn, group_by_key, key_delta
from .keys import canonical

LOG = logging.getLogger("fewstep")

SLOTS26: list[str] = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]

LAYOUTS: dict[str, dict[int, list[str]]] = {
    "sd15": {
        17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(3, 12)],
        26: list(SLOTS26),
    },
    "sdxl": {
        12: ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(6)],
        20: ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)],
    },
}
N_BLOCKS = {"sd15": 12, "sdxl": 9}

_ARCH_ALIASES = {"sd15": "sd15", "sd1": "sd15", "sd1.5": "sd15", "sd1x": "sd15", "sd2": "sd15", "sd21": "sd15",
                 "sd2.1": "sd15", "sdxl": "sdxl", "xl": "sdxl", "ssd1b": "sdxl"}

MERGE_MODES = ("linear", "ties", "dare", "dare_ties")


def normalize_arch(arch: str) -> str:
    """Map an architecture name to "sd15" (SD1.x/SD2.x share the UNet layout) or "sdxl"."""
    a = _ARCH_ALIASES.get(str(arch).lower().replace("-", "").replace("_", ""))
    if a is None:
        raise ValueError(f"unknown architecture {arch!r}; expected one of sd15, sd2, sdxl")
    return a


def _slot_index(slot: str) -> tuple[str, int]:
    if slot.startswith("IN"):
        return "IN", int(slot[2:])
    if slot.startswith("OUT"):
        return "OUT", int(slot[3:])
    return slot, -1


def _preset_value(name: str, slot: str, arch: str) -> float:
    region, i = _slot_index(slot)
    xl = arch == "sdxl"
    ins_max, outd_max = (5, 2) if xl else (4, 6)
    if name == "NONE":
        return 0.0
    if name == "ALL":
        return 1.0
    if name == "ALL0.5":
        return 0.5
    if region == "BASE":
        return 1.0
    ins = region == "IN" and i <= ins_max
    ind = region == "IN" and i > ins_max
    outd = region == "OUT" and i <= outd_max
    outs = region == "OUT" and i > outd_max
    table = {
        "INS": ins, "IND": ind, "INALL": region == "IN", "MIDD": ind or region == "MID" or outd,
        "OUTD": outd, "OUTS": outs, "OUTALL": region == "OUT", "MIDALL": region == "MID",
    }
    return 1.0 if table[name] else 0.0


PRESETS = ("NONE", "ALL", "ALL0.5", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "MIDALL")


@dataclass(frozen=True)
class BlockWeights:
    """Per-slot multipliers. ``weight(slot)`` is 1.0 for slots not in ``slots``."""

    arch: str
    slots: tuple[str, ...]
    values: tuple[float, ...]

    def weight(self, slot: str) -> float:
        try:
            return self.values[self.slots.index(slot)]
        except ValueError:
            return 1.0

    def for_key(self, host_key: str) -> float:
        """Multiplier of the block holding ``host_key``."""
        return self.weight(block_of(host_key, self.arch))

    def key_scale(self) -> KeyScaleFn:
        """A ``lora.fuse`` key_scale callback applying these weights."""
        return lambda entry, key: self.for_key(key)


def parse_block_weights(text: str, arch: str) -> BlockWeights:
    """Parse a LBW vector ("1,0,0.5,…") or a preset name for ``arch``.

    Accepted counts: SD1.5/SD2 17 or 26; SDXL 12 or 20. Presets expand to the full
    layout (26 / 20 slots).

    Raises:
        ValueError: wrong count (message names the expected counts), non-numeric value, unknown preset.
    """
    a = normalize_arch(arch)
    counts = sorted(LAYOUTS[a])
    t = (text or "").strip()
    if not t:
        raise ValueError(f"empty block-weight text; give {' or '.join(map(str, counts))} comma-separated values "
                         f"for {a} or a preset ({', '.join(PRESETS)})")
    up = t.upper()
    if up in PRESETS:
        slots = LAYOUTS[a][max(counts)]
        return BlockWeights(a, tuple(slots), tuple(_preset_value(up, s, a) for s in slots))
    parts = [p.strip() for p in re.split(r"[,\s]+", t) if p.strip()]
    vals: list[float] = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"block weight {p!r} is not a number (or {t!r} is not a preset: "
                             f"{', '.join(PRESETS)})") from None
        if v != v or abs(v) == float("inf"):
            raise ValueError(f"block weight {p!r} is not finite")
        vals.append(v)
    if len(vals) not in LAYOUTS[a]:
        raise ValueError(f"{a} block weights need {' or '.join(map(str, counts))} values, got {len(vals)} "
                         f"({'slots: ' + ','.join(LAYOUTS[a][counts[0]])})")
    return BlockWeights(a, tuple(LAYOUTS[a][len(vals)]), tuple(vals))


_IN_RE = re.compile(r"^input_blocks_(\d+)_")
_OUT_RE = re.compile(r"^output_blocks_(\d+)_")


NO_SLOT = ""
"""``block_of`` of a UNet weight no block-weight slot scales (weight 1)."""


def block_of(host_key: str, arch: str = "sd15") -> str:
    """Block-weight slot (INnn/MID/OUTnn, or ``NO_SLOT``) of an LDM host key such as
    ``diffusion_model.input_blocks.4.1.proj_in.weight``; sd-scripts' rule outside the block stack."""
    a = normalize_arch(arch)
    slot = stack_block_of(host_key, a)
    if slot is not None:
        return slot
    c = canonical(host_key) + "_"
    if a == "sdxl" and c.startswith(("time_embed_", "label_emb_")):
        return "IN00"
    if a == "sdxl" and c.startswith("out_"):
        return "OUT09"
    return NO_SLOT


def stack_block_of(host_key: str, arch: str = "sd15") -> str | None:
    """INnn/MID/OUTnn of a weight inside the UNet's block stack, else None."""
    a = normalize_arch(arch)
    c = canonical(host_key) + "_"
    m = _IN_RE.match(c)
    if m:
        n = int(m.group(1))
        if n >= N_BLOCKS[a]:
            raise ValueError(f"'{host_key}' is input block {n}, but {a} has {N_BLOCKS[a]} (wrong architecture?)")
        return f"IN{n:02d}"
    if c.startswith("middle_block_"):
        return "MID"
    m = _OUT_RE.match(c)
    if m:
        n = int(m.group(1))
        if n >= N_BLOCKS[a]:
            raise ValueError(f"'{host_key}' is output block {n}, but {a} has {N_BLOCKS[a]} (wrong architecture?)")
        return f"OUT{n:02d}"
    return None


def depth_of(host_key: str, arch: str = "sd15") -> int | None:
    """LiNeS depth l (1-based) in the order IN00..→MID→..OUTmax, or None outside the block stack."""
    a = normalize_arch(arch)
    slot = stack_block_of(host_key, a)
    if slot is None:
        return None
    region, i = _slot_index(slot)
    n = N_BLOCKS[a]
    if region == "IN":
        return i + 1
    if region == "MID":
        return n + 1
    if region == "OUT":
        return n + 2 + i
    return None


def depth_count(arch: str) -> int:
    """L: number of depth slots (SD1.5 25, SDXL 19)."""
    return 2 * N_BLOCKS[normalize_arch(arch)] + 1


def lines_scale(host_key: str, arch: str, alpha: float, beta: float) -> float:
    """LiNeS λ(l) = α + β·(l−1)/(L−1); α for weights outside the block stack."""
    l = depth_of(host_key, arch)
    if l is None:
        return float(alpha)
    return float(alpha) + float(beta) * (l - 1) / (depth_count(arch) - 1)


def lines_key_scale(arch: str, alpha: float, beta: float) -> KeyScaleFn:
    """``lora.fuse`` key_scale callback applying LiNeS (use for style adapters only)."""
    a = normalize_arch(arch)
    return lambda entry, key: lines_scale(key, a, alpha, beta)


def combine_key_scales(*fns: KeyScaleFn | None) -> KeyScaleFn | None:
    """Product of several key_scale callbacks (None entries ignored)."""
    live = [f for f in fns if f is not None]
    if not live:
        return None
    return lambda entry, key: _prod(f(entry, key) for f in live)


def _prod(xs) -> float:
    out = 1.0
    for x in xs:
        out *= x
    return out


def _seed_for(seed: int, key: str, index: int) -> int:
    h = hashlib.sha256(f"{int(seed)}\x00{key}\x00{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def trim_top_k(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest-|x| entries of ``t`` (at least one; PEFT/mergekit's count, ties broken by
    torch.topk), zero the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    if density >= 1.0:
        return t.clone()
    flat = t.reshape(-1)
    k = max(1, int(density * flat.numel()))
    idx = flat.abs().topk(k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(t.shape)


def dare_drop(t: torch.Tensor, p: float, seed: int, key: str, index: int) -> torch.Tensor:
    """DARE: zero each element with probability p (seeded by (seed, key, index)), rescale survivors by 1/(1−p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {p}")
    if p == 0.0:
        return t.clone()
    g = torch.Generator(device="cpu")
    g.manual_seed(_seed_for(seed, key, index))
    keep = torch.rand(t.shape, generator=g, dtype=torch.float32) >= p
    return t * keep.to(t.device, t.dtype) / (1.0 - p)


def ties_combine(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES elect + disjoint mean of already-trimmed deltas."""
    stack = torch.stack([d.to(torch.float32) for d in deltas])
    elected = torch.where(stack.sum(dim=0) >= 0, 1.0, -1.0)  # a zero sum elects +1, as PEFT does
    agree = (torch.sign(stack) == elected) & (stack != 0)
    num = (stack * agree).sum(dim=0)
    cnt = agree.sum(dim=0).clamp(min=1)
    return num / cnt


def merge_deltas(deltas: Sequence[torch.Tensor], mode: str = "linear", *, density: float = 0.2, p: float = 0.5,
                 seed: int = 0, key: str = "") -> torch.Tensor:
    """Merge per-adapter full deltas for one key (see module doc for the modes)."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    if not deltas:
        raise ValueError("merge_deltas needs at least one delta")
    if mode == "linear":
        out = deltas[0].to(torch.float32).clone()
        for d in deltas[1:]:
            out += d
        return out
    if mode == "ties":
        return ties_combine([trim_top_k(d.to(torch.float32), density) for d in deltas])
    dropped = [dare_drop(d.to(torch.float32), p, seed, key, i) for i, d in enumerate(deltas)]
    if mode == "dare":
        out = dropped[0]
        for d in dropped[1:]:
            out = out + d
        return out
    return ties_combine(dropped)


StyleScale = KeyScaleFn | Sequence[KeyScaleFn | None] | None


def iter_merged_deltas(accel: Sequence[tuple[Entry, float]], styles: Sequence[Sequence[tuple[Entry, float]]],
                       weight_shapes: dict[str, Sequence[int]], module_to_host: dict[str, str], *,
                       mode: str = "linear", density: float = 0.2, p: float = 0.5, seed: int = 0,
                       accel_key_scale: KeyScaleFn | None = None, style_key_scale: StyleScale = None,
                       base_weight_fn: BaseWeightFn | None = None, device: torch.device | None = None,
                       dora_mode: str = "comfyui") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (host_key, fp32 delta) = accel delta (linear) + merge(style deltas), one key at a time.

    Args:
        accel: the acceleration adapter's ``(entry, strength)`` pairs (never merged, never depth-scaled
            unless ``accel_key_scale`` says so).
        styles: one list of ``(entry, strength)`` per style adapter.
        style_key_scale: one callback for all styles or one per style (block weights, LiNeS).
        mode, density, p, seed: merge parameters (``merge_deltas``).
    """
    for key, (shape, accel_items, present) in plan_merge(accel, styles, weight_shapes, module_to_host, mode=mode,
                                                         accel_key_scale=accel_key_scale,
                                                         style_key_scale=style_key_scale).items():
        yield key, merged_key_delta(key, shape, accel_items, present, mode=mode, density=density, p=p, seed=seed,
                                    base_weight_fn=base_weight_fn, device=device, dora_mode=dora_mode)


KeyPlan = tuple  # (shape, accel items, [(style index, items), ...])


def plan_merge(accel: Sequence[tuple[Entry, float]], styles: Sequence[Sequence[tuple[Entry, float]]],
               weight_shapes: dict[str, Sequence[int]], module_to_host: dict[str, str], *, mode: str = "linear",
               accel_key_scale: KeyScaleFn | None = None, style_key_scale: StyleScale = None) -> dict[str, KeyPlan]:
    """Which entries (with their block-weight / LiNeS-scaled strengths) land on which host key, without computing
    any delta: ``{key: (shape, accel_items, [(style_index, items), ...])}`` in a stable key order."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    if style_key_scale is None or callable(style_key_scale):
        scales = [style_key_scale] * len(styles)
    else:
        scales = list(style_key_scale)
        if len(scales) != len(styles):
            raise ValueError(f"style_key_scale has {len(scales)} entries for {len(styles)} style adapters")
    g_accel = group_by_key(accel, module_to_host, accel_key_scale)
    g_styles = [group_by_key(s, module_to_host, f) for s, f in zip(styles, scales)]
    keys: dict[str, None] = dict.fromkeys(g_accel)
    for g in g_styles:
        for k in g:
            keys.setdefault(k, None)
    plan = {}
    for key in keys:
        shape = weight_shapes.get(key)
        if shape is None:
            items = g_accel.get(key) or next(g[key] for g in g_styles if key in g)
            e = items[0][0]
            raise ValueError(f"{e.file}: module '{e.name}' maps to '{key}', which is not a weight of the model")
        plan[key] = (shape, g_accel.get(key, []), [(i, g[key]) for i, g in enumerate(g_styles) if key in g])
    return plan


def merged_key_delta(key: str, shape: Sequence[int], accel_items, present, *, mode: str = "linear",
                     density: float = 0.2, p: float = 0.5, seed: int = 0,
                     base_weight_fn: BaseWeightFn | None = None, device: torch.device | None = None,
                     dora_mode: str = "comfyui", out: torch.Tensor | None = None) -> torch.Tensor | None:
    """fp32 delta of one key from its ``plan_merge`` entry: accel (linear) + merge(style deltas).

    In linear mode every adapter's plain-LoRA factors go into one GEMM (accel and styles together).
    With ``out`` the delta is added into it (in linear mode without materialising it) and ``out`` is returned."""
    if mode == "linear":
        items = list(accel_items) + [it for _, its in present for it in its]
        if not items:
            return out
        return key_delta(items, key, shape, base_weight_fn, device, dora_mode, out=out)
    if out is not None:
        delta = merged_key_delta(key, shape, accel_items, present, mode=mode, density=density, p=p, seed=seed,
                                 base_weight_fn=base_weight_fn, device=device, dora_mode=dora_mode)
        return out if delta is None else out.add_(delta)
    total: torch.Tensor | None = None
    if accel_items:
        total = key_delta(accel_items, key, shape, base_weight_fn, device, dora_mode)
    if present:
        if mode == "linear":
            sd = key_delta([it for _, items in present for it in items], key, shape, base_weight_fn, device,
                           dora_mode)
        else:
            per = [key_delta(items, key, shape, base_weight_fn, device, dora_mode) for _, items in present]
            # DARE seeds use the style's position in ``styles`` so adding/removing other styles for
            # other keys does not change this key's mask.
            if mode in ("dare", "dare_ties"):
                dropped = [dare_drop(d, p, seed, key, i) for (i, _), d in zip(present, per)]
                sd = dropped[0] if mode == "dare" and len(dropped) == 1 else (
                    torch.stack(dropped).sum(0) if mode == "dare" else ties_combine(dropped))
            else:
                sd = merge_deltas(per, "ties", density=density)
        total = sd if total is None else total + sd
    return total
