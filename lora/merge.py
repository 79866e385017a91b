"""Block weights, LiNeS depth scaling, and linear/TIES/DARE merging of full per-key deltas.

The slots, vector lengths and depth order of each family come from its ``lora.layouts.BlockLayout`` record; the
rules here are the same for every family:

``block_of`` works on the model's weight names: a weight in the block stack gets its region's slot
(``input_blocks.N`` -> INnn, ``input_blocks.0`` -- conv_in -- is IN00 as in LoRA-Block-Weight; ``middle_block``
-> MID; ``output_blocks.N`` -> OUTnn). Weights outside the stack follow the layout's ``outside`` table, i.e.
sd-scripts' ``get_lbw_block_index``: on SDXL time_embed/label_emb -> IN00 and out -> OUT09 (a slot no SDXL vector
lists, so weight 1); on SD1.x/2.x they have no slot (weight 1, as in sd-scripts and LoRA-Block-Weight). BASE is
the text encoders' slot only. As in sd-scripts, a slot that the chosen vector does not list keeps weight 1.0 (e.g.
IN00/IN03/OUT00 with a 17-value vector; LoRA-Block-Weight zeroes those).

Presets (LBW names; LBW defines them for the SD1.5 17-slot vector, reproduced exactly here; other layouts use the
same region rule with their own ``lbw_split``, BASE = 1 except NONE): ALL, NONE, ALL0.5, INS (IN00-04; SDXL
IN00-05), IND (IN05-11; SDXL IN06-08), INALL, MIDD (IND + MID + OUTD), OUTD (OUT00-06; SDXL OUT00-02), OUTS
(OUT07-11; SDXL OUT03-08), OUTALL, MIDALL (MID only).

LiNeS: depth order along the layout's regions (IN00..INmax -> MID -> OUT00..OUTmax), l = 1..L (SD1.5 L = 25,
SDXL L = 19); λ(l) = α + β·(l−1)/(L−1). Weights outside the block stack (time_embed, label_emb, out) get α, as the
paper does for embeddings/heads.

Merge modes act on the FULL per-key delta of each style adapter; the acceleration adapter is never merged, it is
added linearly at its strength:

* linear: Σ τᵢ, exact, with every adapter's plain-LoRA factors in one GEMM (``lora.fuse.key_delta``).
* ties: trim each τᵢ (strength already applied) to its top ``int(density·n)`` entries by |x| (per
  key, as PEFT and mergekit do), elect γ = sgn(Σ τ̂ᵢ) with a zero sum electing +1 (PEFT),
  disjoint mean over entries whose sign equals γ (zeros excluded).
* dare: τ̃ᵢ = mᵢ ⊙ τᵢ / (1−p), mᵢ ~ Bernoulli(1−p) from a CPU torch.Generator seeded by sha256(seed, key, i)
  with i the style's position in the fuse's style list: deterministic and independent of key order and of
  which other styles touch the key.
* dare_ties: DARE drop/rescale, then TIES elect + disjoint mean (no magnitude trim:
  ``density`` is not used, as in PEFT's ``dare_ties`` where the random drop is the pruning).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from collections.abc import Sequence

import torch

from .adapters import Entry
from .fuse import BaseWeightFn, KeyScaleFn, group_by_key, key_delta
from .families import block_layout
from .keys import canonical
from .layouts import BlockLayout
from .seeds import seed_for

LOG = logging.getLogger("fewstep")

MERGE_MODES = ("linear", "ties", "dare", "dare_ties")
PRESETS = ("NONE", "ALL", "ALL0.5", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "MIDALL")
DIT_PRESETS = ("NONE", "ALL", "ALL0.5")  # a DiT has no input/output blocks for the others

Layout = str | BlockLayout


def layout_of(arch: Layout) -> BlockLayout:
    """The block layout ``arch`` names (a family name) or is; ValueError for a DiT layout not yet bound to a model's
    depth (``BlockLayout.bind``)."""
    layout = block_layout(arch) if isinstance(arch, str) else arch
    if layout.from_model:
        raise ValueError(f"the {layout.name} block layout takes its depth from the loaded model; bind it to the "
                         f"model's weight names first")
    return layout


def _slot_index(slot: str) -> tuple[str, int]:
    """("IN", 4) for IN04, ("MID", -1) for MID."""
    m = re.fullmatch(r"([A-Z]+?)(\d+)", slot)
    return (m.group(1), int(m.group(2))) if m else (slot, -1)


def _preset_value(name: str, slot: str, layout: BlockLayout) -> float:
    region, i = _slot_index(slot)
    if name == "NONE":
        return 0.0
    if name == "ALL":
        return 1.0
    if name == "ALL0.5":
        return 0.5
    if layout.lbw_split is None:
        raise ValueError(f"block-weight preset {name} needs input and output blocks; the {layout.name} layout has "
                         f"none (presets for it: {', '.join(DIT_PRESETS)})")
    ins_max, outd_max = layout.lbw_split
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


@dataclass(frozen=True)
class BlockWeights:
    """Per-slot multipliers. ``weight(slot)`` is 1.0 for slots not in ``slots``; ``te_weight`` scales the
    text-encoder parts (the layout's first text-encoder slot: BASE, Flux's CLIP)."""

    arch: Layout
    slots: tuple[str, ...]
    values: tuple[float, ...]

    def weight(self, slot: str) -> float:
        try:
            return self.values[self.slots.index(slot)]
        except ValueError:
            return 1.0

    @property
    def te_weight(self) -> float:
        return self.weight(layout_of(self.arch).te_slots[0])

    def for_key(self, host_key: str) -> float:
        """Multiplier of the block holding ``host_key``."""
        return self.weight(block_of(host_key, self.arch))

    def key_scale(self) -> KeyScaleFn:
        """A ``lora.fuse`` key_scale callback applying these weights."""
        return lambda entry, key: self.for_key(key)


def parse_block_weights(text: str, arch: Layout) -> BlockWeights:
    """Parse a LBW vector ("1,0,0.5,…") or a preset name for family ``arch`` (a name, or a layout bound to the
    model).

    Accepted counts: the layout's vector lengths (SD1.5/SD2 17 or 26; SDXL 12 or 20; a DiT one value per block, or
    text-encoder slot(s), IN, one per block, OUT). Presets expand to the longest vector.

    Raises:
        ValueError: wrong count (message names the layout, the expected counts and the slots), non-numeric value,
        unknown preset.
    """
    layout = layout_of(arch)
    a, counts = layout.name, layout.counts
    presets = PRESETS if layout.lbw_split is not None else DIT_PRESETS
    t = (text or "").strip()
    if not t:
        raise ValueError(f"empty block-weight text; give {' or '.join(map(str, counts))} comma-separated values "
                         f"for {a} or a preset ({', '.join(presets)})")
    up = t.upper()
    if up in PRESETS:
        slots = layout.slots(max(counts))
        return BlockWeights(layout, slots, tuple(_preset_value(up, s, layout) for s in slots))
    vals = _numbers(t)
    if layout.slots(len(vals)) is None:
        longest = layout.slots(max(counts))
        raise ValueError(f"{a} block weights need {' or '.join(map(str, counts))} values, got {len(vals)} (slots: "
                         f"{_slot_list(layout.slots(counts[0]))}; or {_slot_list(longest)})")
    return BlockWeights(layout, layout.slots(len(vals)), tuple(vals))


def _slot_list(slots: Sequence[str]) -> str:
    return ",".join(slots) if len(slots) <= 30 else ",".join([*slots[:12], "...", *slots[-6:]])


def _numbers(t: str) -> list[float]:
    vals: list[float] = []
    for p in (p.strip() for p in re.split(r"[,\s]+", t) if p.strip()):
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"block weight {p!r} is not a number (or {t!r} is not a preset: "
                             f"{', '.join(PRESETS)})") from None
        if v != v or abs(v) == float("inf"):
            raise ValueError(f"block weight {p!r} is not finite")
        vals.append(v)
    return vals


def check_block_weights(text: str) -> None:
    """ValueError unless ``text`` is a preset or a comma list of numbers (the syntax check of a node that does not
    know the model yet; its length is checked against the model's layout by the fuse)."""
    t = (text or "").strip()
    if not t:
        raise ValueError(f"empty block-weight text; give comma-separated values or a preset ({', '.join(PRESETS)})")
    if t.upper() not in PRESETS:
        _numbers(t)


NO_SLOT = ""
"""``block_of`` of a weight no block-weight slot scales (weight 1)."""


def block_of(host_key: str, arch: Layout = "sd15") -> str:
    """Block-weight slot (e.g. INnn/MID/OUTnn, D03, or ``NO_SLOT``) of a host weight key such as
    ``diffusion_model.input_blocks.4.1.proj_in.weight``; the layout's ``outside`` rule outside the block stack."""
    layout = layout_of(arch)
    slot = _stack_slot(host_key, layout)
    if slot is not None:
        return slot[0]
    c = canonical(host_key) + "_"
    return next((s for prefix, s in layout.outside if c.startswith(prefix)), NO_SLOT)


def _stack_slot(host_key: str, layout: BlockLayout) -> tuple[str, int] | None:
    """(slot, LiNeS depth l) of a weight inside the block stack, else None."""
    c = canonical(host_key) + "_"
    depth = 0
    for r in layout.regions:
        m = re.match(r.pattern, c)
        if m:
            if not m.groups():
                return r.name, depth + 1
            n = int(m.group(1))
            if n >= r.count:
                raise ValueError(f"'{host_key}' is {r.label} {n}, but {layout.name} has {r.count} (wrong "
                                 f"architecture?)")
            return f"{r.name}{n:02d}", depth + n + 1
        depth += r.count
    return None


def depth_of(host_key: str, arch: Layout = "sd15") -> int | None:
    """LiNeS depth l (1-based) along the layout's regions, or None outside the block stack."""
    slot = _stack_slot(host_key, layout_of(arch))
    return None if slot is None else slot[1]


def depth_count(arch: Layout) -> int:
    """L: number of depth slots (SD1.5 25, SDXL 19, a DiT its number of blocks)."""
    return layout_of(arch).depth_count


def lines_scale(host_key: str, arch: Layout, alpha: float, beta: float) -> float:
    """LiNeS λ(l) = α + β·(l−1)/(L−1); α for weights outside the block stack."""
    l = depth_of(host_key, arch)
    if l is None:
        return float(alpha)
    n = depth_count(arch)
    return float(alpha) + (float(beta) * (l - 1) / (n - 1) if n > 1 else 0.0)


def lines_key_scale(arch: Layout, alpha: float, beta: float) -> KeyScaleFn:
    """``lora.fuse`` key_scale callback applying LiNeS (use for style adapters only)."""
    layout = layout_of(arch)  # an unknown family fails here, not at the first key
    return lambda entry, key: lines_scale(key, layout, alpha, beta)


def combine_key_scales(*fns: KeyScaleFn | None) -> KeyScaleFn | None:
    """Product of several key_scale callbacks (None entries ignored)."""
    live = [f for f in fns if f is not None]
    if not live:
        return None

    def scale(entry, key) -> float:
        out = 1.0
        for f in live:
            out *= f(entry, key)
        return out
    return scale


# ---------------------------------------------------------------- TIES / DARE

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
    g.manual_seed(seed_for(seed, key, index))
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


def merge_deltas(deltas: Sequence[torch.Tensor], mode: str, *, density: float = 0.2, p: float = 0.5,
                 seed: int = 0, key: str = "", indices: Sequence[int] | None = None) -> torch.Tensor:
    """TIES / DARE / DARE-TIES merge of per-style full deltas for one key (see module doc).

    ``indices``: each delta's style position (DARE's seed index); default 0, 1, 2, … (linear mode is not a merge
    here: it is the one GEMM of ``key_delta``)."""
    if mode not in MERGE_MODES or mode == "linear":
        raise ValueError(f"merge_deltas mode must be one of {MERGE_MODES[1:]}, got {mode!r}")
    if not deltas:
        raise ValueError("merge_deltas needs at least one delta")
    if mode == "ties":
        return ties_combine([trim_top_k(d.to(torch.float32), density) for d in deltas])
    idx = range(len(deltas)) if indices is None else indices
    dropped = [dare_drop(d.to(torch.float32), p, seed, key, i) for i, d in zip(idx, deltas)]
    if mode == "dare":
        out = dropped[0]
        for d in dropped[1:]:
            out = out + d
        return out
    return ties_combine(dropped)


# ---------------------------------------------------------------- planning and per-key deltas

StyleScale = None | KeyScaleFn | Sequence[KeyScaleFn | None]
KeyPlan = tuple  # (shape, accel items, [(style index, items), ...])


def plan_merge(accel: Sequence[tuple[Entry, float]], styles: Sequence[Sequence[tuple[Entry, float]]],
               weight_shapes: dict[str, Sequence[int]], module_to_host: dict[str, str], *, mode: str = "linear",
               accel_key_scale: KeyScaleFn | None = None, style_key_scale: StyleScale = None) -> dict[str, KeyPlan]:
    """Which entries (with their block-weight / LiNeS-scaled strengths) land on which host key, without computing
    any delta: ``{key: (shape, accel_items, [(style_index, items), ...])}`` in a stable key order.

    Args:
        accel: the acceleration adapter's ``(entry, strength)`` pairs (never merged, never depth-scaled
            unless ``accel_key_scale`` says so).
        styles: one list of ``(entry, strength)`` per style adapter.
        style_key_scale: one callback for all styles or one per style (block weights, LiNeS).
    """
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
                     out: torch.Tensor | None = None) -> torch.Tensor | None:
    """fp32 delta of one key from its ``plan_merge`` entry: accel (linear) + merge(style deltas).

    In linear mode every adapter's plain-LoRA factors go into one GEMM (accel and styles together).
    With ``out`` the delta is added into it (in linear mode without materialising it) and ``out`` is returned."""
    if mode == "linear":
        items = list(accel_items) + [it for _, its in present for it in its]
        if not items:
            return out
        return key_delta(items, key, shape, base_weight_fn, device, out=out)
    total: torch.Tensor | None = None
    if accel_items:
        total = key_delta(accel_items, key, shape, base_weight_fn, device)
    if present:
        per = [key_delta(items, key, shape, base_weight_fn, device) for _, items in present]
        # DARE seeds use the style's position in ``styles``, so adding/removing other styles for
        # other keys does not change this key's mask.
        sd = merge_deltas(per, mode, density=density, p=p, seed=seed, key=key, indices=[i for i, _ in present])
        total = sd if total is None else total + sd
    if out is None:
        return total
    return out if total is None else out.add_(total)
