"""Model families as the LoRA code sees them: one key layout and one block layout per family, in one list.

* ``KeyLayout`` -- how LoRA module names map onto the model's weight keys (``lora.keys``): the prefixes trainers put
  in front of the model path, the host's key prefix, which host table gives the diffusers -> model names, and how
  to name a module's block in a report.
* ``BlockLayout`` -- the block-weight slots and LiNeS depth order (``lora.merge``): the block-stack regions in depth
  order, the LoRA-Block-Weight vector lengths and their slots, where weights outside the stack go, and the
  shallow/deep split of the LBW presets.

UNet families (sd-scripts ``svd_merge_lora.get_lbw_block_index`` / LoRA-Block-Weight)::

    26-slot grid: BASE, IN00..IN11, MID, OUT00..OUT11
    SD1.5 17: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    SD1.5 26: the full grid
    SDXL  12: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05
    SDXL  20: BASE, IN00..IN08, MID, OUT00..OUT08

SD1.x and SD2.x share the SD1.5 layout, SSD-1B the SDXL one (same block indices). Adding a family (e.g. a DiT:
Flux ``double_blocks``/``single_blocks``) = its ``KeyLayout`` and ``BlockLayout`` records plus one ``FAMILIES``
entry; ``NOT_YET`` names the families the host loads that no record covers yet.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyLayout:
    """How a family's LoRA module names map onto its weight keys.

    Attributes:
        name: layout name (messages).
        prefixes: module-name prefixes trainers write in front of the model path (kohya ``lora_unet_``, PEFT
            ``unet.``/``base_model.model.``, ...), stripped repeatedly before lookup; longer first.
        host_prefix: prefix of the host's weight keys in front of the model path.
        diffusers_map: which host table maps diffusers weight names onto the model's ("unet": ComfyUI
            ``comfy.utils.unet_to_diffusers``; "" none); the node layer fetches it.
        block_re: regex whose group 1 names the block of a canonical module name (grouping unmatched modules).
    """

    name: str
    prefixes: tuple[str, ...]
    host_prefix: str = "diffusion_model."
    diffusers_map: str = ""
    block_re: str = r"^([a-z]+(?:_\d+)?)"


@dataclass(frozen=True)
class Region:
    """One stretch of the block stack: slots ``<name><nn>`` (``<name>`` alone when ``count`` is 1 and the
    pattern has no index group), matched on the canonical weight name plus a trailing ``_``."""

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
        outside: (canonical-name prefix, slot) for weights outside the stack that a slot scales (sd-scripts);
            others have no slot (weight 1; LiNeS gives them α).
        lbw_split: last index of the shallow input blocks (INS) and of the deep output blocks (OUTD) for the
            LoRA-Block-Weight presets.
    """

    name: str
    regions: tuple[Region, ...]
    vectors: tuple[tuple[int, tuple[str, ...]], ...]
    outside: tuple[tuple[str, str], ...] = ()
    lbw_split: tuple[int, int] = (0, 0)

    def slots(self, count: int) -> tuple[str, ...] | None:
        return dict(self.vectors).get(count)

    @property
    def counts(self) -> list[int]:
        return sorted(n for n, _ in self.vectors)

    @property
    def depth_count(self) -> int:
        """L: number of depth slots (SD1.5 25, SDXL 19)."""
        return sum(r.count for r in self.regions)


@dataclass(frozen=True)
class Family:
    """One model family: its name (``model_base`` strings), a label for messages, and its two layouts."""

    name: str
    label: str
    keys: KeyLayout
    blocks: BlockLayout


def _grid(n: int) -> tuple[Region, ...]:
    return (Region("IN", r"^input_blocks_(\d+)_", n, "input block"),
            Region("MID", r"^middle_block_", 1, "middle block"),
            Region("OUT", r"^output_blocks_(\d+)_", n, "output block"))


UNET_KEYS = KeyLayout(
    name="unet",
    prefixes=("unet.base_model.model.", "base_model.model.unet.", "base_model.model.", "model.diffusion_model.",
              "diffusion_model.", "lora_unet_", "oft_unet_", "lycoris_", "unet."),
    diffusers_map="unet",
    block_re=r"(input_blocks_\d+|middle_block|output_blocks_\d+|(?:down|up)_blocks_\d+|mid_block|time_embed|"
             r"label_emb|add_embedding|conv_in|conv_out|out)")

_IN, _OUT = (lambda *i: tuple(f"IN{n:02d}" for n in i)), (lambda *i: tuple(f"OUT{n:02d}" for n in i))

SD15_BLOCKS = BlockLayout(
    name="sd15", regions=_grid(12),
    vectors=((17, ("BASE", *_IN(1, 2, 4, 5, 7, 8), "MID", *_OUT(*range(3, 12)))),
             (26, ("BASE", *_IN(*range(12)), "MID", *_OUT(*range(12))))),
    lbw_split=(4, 6))

SDXL_BLOCKS = BlockLayout(
    name="sdxl", regions=_grid(9),
    vectors=((12, ("BASE", *_IN(4, 5, 7, 8), "MID", *_OUT(*range(6)))),
             (20, ("BASE", *_IN(*range(9)), "MID", *_OUT(*range(9))))),
    outside=(("time_embed_", "IN00"), ("label_emb_", "IN00"), ("out_", "OUT09")),
    lbw_split=(5, 2))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "SD1.5", UNET_KEYS, SD15_BLOCKS),
    Family("sd2", "SD2", UNET_KEYS, SD15_BLOCKS),
    Family("sdxl", "SDXL", UNET_KEYS, SDXL_BLOCKS),
    Family("ssd1b", "SSD-1B", UNET_KEYS, SDXL_BLOCKS),
)}

NOT_YET = ("sd3", "flux", "wan", "wan22_5b", "qwen_image", "hunyuan_video")
"""Families the host loads (``nodes.common.model_base``) that have no LoRA layout record yet."""


def family(name: str) -> Family:
    """The family record of a ``model_base`` name; ValueError naming the family when no record covers it."""
    f = FAMILIES.get(name)
    if f is not None:
        return f
    supported = ", ".join(FAMILIES)
    if name in NOT_YET:
        raise ValueError(f"the model is a {name} model; LoRA fusing does not support the {name} family yet "
                         f"(supported: {supported})")
    raise ValueError(f"the model's family ({name!r}) is not one LoRA fusing knows (supported: {supported})")


def block_layout(name: str) -> BlockLayout:
    """The block layout of family ``name`` (ValueError for a family without one)."""
    return family(name).blocks

