"""The UNet families: SD1.x, SD2.x, SDXL and SSD-1B (one key layout; SD1.5's and SDXL's block layouts).

Block-weight vectors follow sd-scripts ``svd_merge_lora.get_lbw_block_index`` / LoRA-Block-Weight::

    26-slot grid: BASE, IN00..IN11, MID, OUT00..OUT11
    SD1.5 17: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    SD1.5 26: the full grid
    SDXL  12: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05
    SDXL  20: BASE, IN00..IN08, MID, OUT00..OUT08

SD1.x and SD2.x share the SD1.5 layout, SSD-1B the SDXL one (same block indices). Their acceleration LoRAs are
told apart by ``lora.detect``'s UNet structure analysis and release names.
"""
from __future__ import annotations

from ..layouts import BlockLayout, Family, KeyLayout, Region


def _grid(n: int) -> tuple[Region, ...]:
    return (Region("IN", r"^input_blocks_(\d+)_", n, "input block"),
            Region("MID", r"^middle_block_", 1, "middle block"),
            Region("OUT", r"^output_blocks_(\d+)_", n, "output block"))


KEYS = KeyLayout(
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

FAMILIES = (
    Family("sd15", "SD1.5", KEYS, SD15_BLOCKS),
    Family("sd2", "SD2", KEYS, SD15_BLOCKS),
    Family("sdxl", "SDXL", KEYS, SDXL_BLOCKS),
    Family("ssd1b", "SSD-1B", KEYS, SDXL_BLOCKS),
)
