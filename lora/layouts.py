"""The records a model family is made of, as the LoRA code sees it: one key layout and one block layout.

* ``KeyLayout`` -- how LoRA module names map onto the model's weight keys (``lora.keys``): the prefixes trainers put
  in front of the model path, the host's key prefix, which host table gives the diffusers -> model names, other
  spellings of the model's modules (``Alias``: diffusers names the host does not map, with the rows of a fused qkv
  weight they cover), modules only some variants of the family have (``VariantOnly``: Wan's image cross-attention on a
  text-to-video model), and how to name a module's block in a report.
* ``BlockLayout`` -- the block-weight slots and LiNeS depth order (``lora.merge``): the block-stack regions in depth
  order, the LoRA-Block-Weight vector lengths and their slots, where weights outside the stack go, and the
  shallow/deep split of the LBW presets. A DiT's depth differs between model sizes (Wan 1.3B 30 blocks, 14B 40), so
  its regions have ``count`` 0 until ``bind`` reads the depth off the loaded model's weight names.

The families themselves (one module each) and their list are in ``lora.families``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from collections.abc import Iterable


@dataclass(frozen=True)
class Alias:
    """Another spelling of a model module, in canonical (underscore) form.

    ``pattern`` matches the canonical name of a model weight (``blocks_3_self_attn_q``); ``template`` (a
    ``re.sub`` replacement) gives the other spelling (``blocks_3_attn1_to_q``). ``rows`` = (start, size) in units of
    the weight's input width when the other spelling names only some rows of the weight (diffusers' separate
    to_q/to_k/to_v of a fused qkv projection); size -1 = to the last row. ``swap_halves``: the other spelling
    orders the two row halves the other way (diffusers' (scale, shift) modulation vs the original (shift, scale)),
    as ComfyUI's ``swap_scale_shift``."""

    pattern: str
    template: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


@dataclass(frozen=True)
class VariantOnly:
    """Modules that only some variants of a family have (``pattern`` on the canonical name), reported in one line
    (``what``) instead of as unmatched when the loaded model lacks them."""

    pattern: str
    what: str


@dataclass(frozen=True)
class KeyLayout:
    """How a family's LoRA module names map onto its weight keys.

    Attributes:
        name: layout name (messages).
        prefixes: module-name prefixes trainers write in front of the model path (kohya ``lora_unet_``, PEFT
            ``unet.``/``base_model.model.``, diffusers ``transformer.``, ...), stripped repeatedly before lookup.
        host_prefix: prefix of the host's weight keys in front of the model path.
        diffusers_map: which host table maps diffusers weight names onto the model's ("unet": ComfyUI
            ``comfy.utils.unet_to_diffusers``; "" none -- the DiT tables the host has are already in its LoRA key
            map); the node layer fetches it.
        block_re: regex whose group 1 names the block of a canonical module name (grouping unmatched modules).
        aliases: other spellings of the model's modules the host's key map lacks.
        optional: modules some variants of the family lack (reported once, not counted as unmatched).
    """

    name: str
    prefixes: tuple[str, ...]
    host_prefix: str = "diffusion_model."
    diffusers_map: str = ""
    block_re: str = r"^([a-z]+(?:_\d+)?)"
    aliases: tuple[Alias, ...] = ()
    optional: tuple[VariantOnly, ...] = ()


@dataclass(frozen=True)
class Region:
    """One stretch of the block stack: slots ``<name><nn>`` (``<name>`` alone when ``count`` is 1 and the
    pattern has no index group), matched on the canonical weight name plus a trailing ``_``. ``count`` 0: the
    model's depth, read by ``BlockLayout.bind``."""

    name: str
    pattern: str
    count: int
    label: str


@dataclass(frozen=True)
class BlockLayout:
    """Block-weight slots and LiNeS depth of a family.

    Attributes:
        name: layout name (messages: "sd15 block weights need 17 or 26 values").
        regions: the block stack in depth order (LiNeS l = 1..L along it).
        vectors: (vector length, slots) pairs a block-weight vector may have; the longest is what presets fill.
            Empty for a DiT until ``bind``: then (te + IN + every block + OUT) and (every block alone).
        outside: (canonical-name prefix, slot) for weights outside the stack that a slot scales (sd-scripts);
            others have no slot (weight 1; LiNeS gives them α).
        lbw_split: last index of the shallow input blocks (INS) and of the deep output blocks (OUTD) for the
            LoRA-Block-Weight presets; None for a layout without input/output blocks (the DiTs: only ALL, NONE and
            ALL0.5 apply).
        te_slots: the text-encoder slots at the head of the long vector (BASE; Flux follows LoRA-Block-Weight's
            CLIP, T5). The first one scales the LoRAs' text-encoder parts.
        from_model: the region counts are the model's (a DiT template until ``bind``).
    """

    name: str
    regions: tuple[Region, ...]
    vectors: tuple[tuple[int, tuple[str, ...]], ...] = ()
    outside: tuple[tuple[str, str], ...] = ()
    lbw_split: tuple[int, int] | None = (0, 0)
    te_slots: tuple[str, ...] = ("BASE",)
    from_model: bool = False

    def slots(self, count: int) -> tuple[str, ...] | None:
        return dict(self.vectors).get(count)

    @property
    def counts(self) -> list[int]:
        return sorted(n for n, _ in self.vectors)

    @property
    def depth_count(self) -> int:
        """L: number of depth slots (SD1.5 25, SDXL 19; a bound DiT its number of blocks)."""
        return sum(r.count for r in self.regions)

    def bind(self, keys: Iterable[str]) -> BlockLayout:
        """This layout with every region's ``count`` read off the model's canonical weight names (its highest block
        index + 1) and the DiT vectors built; a UNet layout (fixed counts) comes back unchanged."""
        if not self.from_model:
            return self
        names = [k + "_" for k in keys]
        regions = []
        for r in self.regions:
            idx = [int(m.group(1)) for n in names for m in [re.match(r.pattern, n)] if m]
            regions.append(replace(r, count=max(idx) + 1 if idx else 0))
        stack = tuple(f"{r.name}{i:02d}" for r in regions for i in range(r.count))
        longest = (*self.te_slots, "IN", *stack, "OUT")
        return replace(self, regions=tuple(regions), vectors=((len(stack), stack), (len(longest), longest)),
                       from_model=False)


@dataclass(frozen=True)
class Release:
    """An acceleration LoRA release of a family, told by name (``lora.detect``).

    ``pattern`` is searched in the lower-cased file name, the folders above a generic file name and the header's
    titles; a named group ``steps`` gives the step count. ``preset`` is the sampler preset's ``Preset.name``
    (``{steps}`` filled in), given only for the step counts in ``steps`` (() = any); "" = no preset.

    What the release's file is like, which a file must show for its name to count (structure outranks names):
    ``targets`` "attn+mlp" (every block's attention and MLP / FFN linears) or "attn" (every block's attention), and
    a rank of at least ``min_rank``."""

    pattern: str
    kind: str
    label: str
    preset: str = ""
    steps: tuple[int, ...] = ()
    default_steps: int | None = None
    experts: bool = False  # a two-expert release (Wan 2.2): the name says which expert (high / low noise) it is for
    targets: str = "attn+mlp"
    min_rank: int = 32


@dataclass(frozen=True)
class Family:
    """One model family: its name (``model_base`` strings), a label for messages, its two layouts, and what tells
    its LoRAs apart (``lora.detect``): ``scheme`` matches the module names of its naming schemes (canonical form;
    families may share one, e.g. Flux and HunyuanVideo in diffusers names), ``only`` names only it has, and its
    acceleration ``releases``. The UNet families are told apart by ``lora.detect``'s own structure analysis."""

    name: str
    label: str
    keys: KeyLayout
    blocks: BlockLayout
    scheme: str = ""
    only: str = ""
    releases: tuple[Release, ...] = ()
    widths: tuple[int, ...] = ()  # model widths that tell it from a family with the same names (Wan 2.2 5B: 3072)
