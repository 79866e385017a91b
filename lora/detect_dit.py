"""The DiT side of ``lora.detect``: which DiT family an adapter is for, whether it is shaped like an acceleration
LoRA, and the families' release names.

Family, from module names (canonical form, the DiT prefixes stripped): the families whose naming scheme
(``Family.scheme``) covers the most modules (at least half); where several share a scheme (Flux, SD3, HunyuanVideo and
Qwen-Image in diffusers names), the ones with names only they have (``Family.only``); same names, another width
(Wan 2.2 5B) by the width of the blocks' LoRA inputs; else no family (the candidates are listed) and the key
matching against the loaded model decides.

Structure, without a name: acceleration-shaped = no text-encoder keys, one rank of 16 or more, every block of the
model (or, without a model, blocks 0..n with no gap) with attention and MLP/FFN, plus layers outside the blocks
(embeddings, head) -- what lightx2v and CausVid carry; style-shaped = text-encoder keys, blocks skipped, or a rank
below 16; else unclear.

With a release name the structure must be that release's (``release_problems``): every block, the release's
targets (attention and MLP; attention alone for PCM-SD3 and FastVideo) and its rank or more, no text-encoder
keys. Otherwise the name does not count.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .adapters import LoraModule
from .families import FAMILIES, dit
from .formats import Adapter
from .layouts import BlockLayout, Family, KeyLayout, Release
from .detect_unet import Shape, base_from_text

DIT_FAMILIES = tuple(f for f in FAMILIES.values() if f.scheme)
_NAMES = KeyLayout("dit", dit.PREFIXES)
_BLOCK = re.compile(r"^(double_blocks|single_blocks|single_transformer_blocks|transformer_blocks|joint_blocks|blocks)"
                    r"_(\d+)_(\w+)$")
_SINGLE = ("single_blocks", "single_transformer_blocks")
_ATTN = re.compile(r"attn|qkv|to_[qkv]$|add_[qkv]_proj|to_out|to_add_out|linear1")
_MLP = re.compile(r"ffn|mlp|(^|_)ff(_|$)|ff_context|linear[12]|proj_mlp|fc[12]")
_EXPERT = re.compile(r"(?<![a-z])(high|low)(?:[-_ ]?noise)?(?![a-z])")


def names_of(adapter: Adapter) -> list[str]:
    from .keys import canonical
    return [canonical(e.name, _NAMES) for e in adapter.entries]


def _width(adapter: Adapter, names: list[str]) -> int | None:
    """The most common input width of the blocks' attention LoRAs (the model width), or None."""
    c = Counter(int(e.down.reshape(e.down.shape[0], -1).shape[1]) for e, n in zip(adapter.entries, names)
                if isinstance(e, LoraModule) and _BLOCK.match(n) and re.search(r"to_q$|_q$|qkv$", n))
    return c.most_common(1)[0][0] if c else None


def identify(adapter: Adapter, names: list[str] | None = None) -> tuple[str | None, str, tuple[str, ...]]:
    """(family name or None, why, candidate families when several fit)."""
    names = names_of(adapter) if names is None else names
    uniq = sorted(set(names))
    if not uniq:
        return None, "", ()
    cover = {f.name: sum(bool(re.match(f.scheme, n)) for n in uniq) for f in DIT_FAMILIES}
    best = max(cover.values())
    cands = [f for f in DIT_FAMILIES if cover[f.name] == best and best >= 0.5 * len(uniq)]
    if len(cands) > 1:
        only = [f for f in cands if any(re.match(f.only, n) for n in uniq)]
        cands = only or cands
    width = _width(adapter, names)
    if len(cands) > 1 and any(f.widths for f in cands):
        wide = {w for f in cands for w in f.widths}
        cands = [f for f in cands if (width in f.widths if f.widths else width not in wide)]
    if len(cands) > 1:
        hint = base_from_text(" ".join([adapter.name, *adapter.metadata.get("modelspec.architecture", "").split()]))
        cands = [f for f in cands if f.name == hint] or cands
    if len(cands) == 1:
        f = cands[0]
        return f.name, f"{f.label} module names" + (f", width {width}" if width else ""), ()
    return None, "", tuple(f.name for f in cands)


def _blocks(names: list[str]) -> dict[tuple[str, int], set[str]]:
    """(stream, block index) -> what the adapter covers there ("attn", "mlp")."""
    out: dict[tuple[str, int], set[str]] = {}
    for n in names:
        m = _BLOCK.match(n)
        if not m:
            continue
        stream = "single" if m.group(1) in _SINGLE else "double"
        got = out.setdefault((stream, int(m.group(2))), set())
        rest = m.group(3)
        if _ATTN.search(rest):
            got.add("attn")
        if _MLP.search(rest):
            got.add("mlp")
    return out


@dataclass
class DitFacts:
    """What a DiT adapter covers: blocks (with attention / MLP per block), whether every block of the model (or,
    without a model, blocks 0..n with no gap), modules outside the blocks, bias / norm diffs, LoRA ranks,
    text-encoder keys."""

    covered: dict[tuple[str, int], set[str]]
    every: bool
    gaps: bool
    depth: int | None
    outside: int
    diffs: int
    ranks: set[int]
    te: bool

    def has_everywhere(self, parts: set[str]) -> bool:
        return bool(self.covered) and all(parts <= v for v in self.covered.values())

    def describe(self) -> list[str]:
        both = self.has_everywhere({"attn", "mlp"})
        attn_only = bool(self.covered) and not any("mlp" in v for v in self.covered.values())
        return [("has text encoder keys" if self.te else "no text encoder keys"),
                f"{len(self.covered)} blocks covered" + (f" of the model's {self.depth}" if self.depth else "")
                + (" (with gaps)" if self.gaps else "")
                + ("; attention and MLP in each" if both else "; attention only" if attn_only else ""),
                f"{self.outside} modules outside the blocks (embeddings, head), {self.diffs} bias/norm diffs",
                f"uniform rank {next(iter(self.ranks))}" if len(self.ranks) == 1 else
                (f"mixed ranks {sorted(self.ranks)}" if self.ranks else "no plain LoRA modules")]


def dit_facts(adapter: Adapter, names: list[str], blocks: BlockLayout | None = None) -> DitFacts:
    covered = _blocks(names)
    streams: dict[str, list[int]] = {}
    for st, i in covered:
        streams.setdefault(st, []).append(i)
    gaps = any(sorted(v) != list(range(max(v) + 1)) for v in streams.values())
    depth = blocks.depth_count if blocks is not None and not blocks.from_model else None
    every = (not gaps and bool(covered)) if depth is None else len(covered) == depth
    return DitFacts(covered=covered, every=every, gaps=gaps, depth=depth,
                    outside=sum(1 for n in set(names) if not _BLOCK.match(n)),
                    diffs=sum(1 for e in adapter.entries if e.kind in ("diff", "bias_diff")),
                    ranks={e.rank for e in adapter.entries if isinstance(e, LoraModule)},
                    te=bool(adapter.text_encoder_keys))


STYLE_RANK = 16
"""Below this rank a DiT LoRA is style-shaped: the DiT distillation releases use rank 32 to 128."""


def dit_shape(adapter: Adapter, blocks: BlockLayout | None = None) -> Shape:
    """The DiT structure verdict (module doc); ``blocks``: the loaded model's bound block layout, if known."""
    names = names_of(adapter)
    base, why_base, cands = identify(adapter, names)
    f = dit_facts(adapter, names, blocks)
    if not f.covered and base is None:
        return Shape("none", None, candidates=cands)
    why = f.describe()
    low_rank = bool(f.ranks) and max(f.ranks) < STYLE_RANK
    if (not f.te and len(f.ranks) == 1 and not low_rank and f.every and f.has_everywhere({"attn", "mlp"})
            and f.outside):
        verdict = "accel"
    elif f.te or f.gaps or low_rank:
        verdict = "style"
        why.append(f"a style LoRA's shape (text-encoder keys, blocks skipped, or rank below {STYLE_RANK})")
    else:
        verdict = "unclear"
    return Shape(verdict, base, why_base, why, cands, dit=f)


def release_problems(r: Release, f: DitFacts) -> list[str]:
    """Why the structure is not that of release ``r`` (its targets and rank); [] when it fits."""
    out = []
    if f.te:
        out.append("it has text-encoder keys")
    if not f.every:
        out.append("it does not cover every block" + (f" of the model ({len(f.covered)} of {f.depth})"
                                                      if f.depth else " (blocks skipped)"))
    parts = {"attn", "mlp"} if r.targets == "attn+mlp" else {"attn"}
    if not f.has_everywhere(parts):
        out.append(f"not every block has {' and '.join(sorted(parts))} modules ({r.label} trains "
                   f"{'attention and MLP' if len(parts) == 2 else 'attention'} linears in every block)")
    if f.ranks and min(f.ranks) < r.min_rank:
        out.append(f"rank {min(f.ranks)} is below {r.label}'s ({r.min_rank} or more)")
    return out


def expert_in(text: str) -> str:
    """"high" / "low" when ``text`` names a Wan 2.2 expert (``high_noise``, ``_HIGH``), else ""."""
    m = _EXPERT.search(text.lower())
    return m.group(1) if m else ""


def match_release(text: str, families: tuple[Family, ...]) -> tuple[Family, Release, int | None, str] | None:
    """(family, release, steps, expert) of the first release ``text`` names among ``families``, or None."""
    t = text.lower()
    for f in families:
        for r in f.releases:
            m = re.search(r.pattern, t)
            if m:
                steps = m.groupdict().get("steps")
                expert = _EXPERT.search(t) if r.experts else None
                return f, r, int(steps) if steps else r.default_steps, expert.group(1) if expert else ""
    return None


def release_preset(r: Release, steps: int | None) -> str | None:
    """The preset name of a release at ``steps`` (None when the release has no preset for that step count)."""
    if not r.preset or (r.steps and steps not in r.steps):
        return None
    return r.preset.format(steps=steps)


def preset_names() -> frozenset[str]:
    """Every preset a DiT release can report."""
    out = set()
    for f in DIT_FAMILIES:
        for r in f.releases:
            for n in (r.steps or (r.default_steps,)):
                p = release_preset(r, n)
                if p:
                    out.add(p)
    return frozenset(out)
