"""What the DiT families share: the module-name prefixes trainers write and the block-layout template."""
from __future__ import annotations

from ..layouts import BlockLayout, Region

PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "lora_transformer_", "transformer.",
            "lora_unet__", "lora_unet_", "lycoris_")
"""Generic (``diffusion_model.``), kohya / musubi-tuner (``lora_unet_``; Wan-Fun's ``lora_unet__``), diffusers /
ai-toolkit / SimpleTuner / diffusion-pipe (``transformer.``), PEFT (``base_model.model.``), OneTrainer
(``lora_transformer_``) and SimpleTuner LyCORIS (``lycoris_``)."""


def blocks(name: str, regions: tuple[tuple[str, str, str], ...], outside_in: tuple[str, ...],
           outside_out: tuple[str, ...], te_slots: tuple[str, ...] = ("BASE",)) -> BlockLayout:
    """A DiT block layout: ``regions`` (slot letter, canonical block prefix, label) in depth order, their counts read
    from the model (``BlockLayout.bind``); weights whose canonical names start with ``outside_in`` / ``outside_out``
    get the IN / OUT slot. Vectors: every block (one value each), or text-encoder slot(s), IN, every block, OUT."""
    return BlockLayout(
        name=name, regions=tuple(Region(s, rf"^{p}_(\d+)_", 0, label) for s, p, label in regions),
        outside=tuple((p + "_", "IN") for p in outside_in) + tuple((p + "_", "OUT") for p in outside_out),
        lbw_split=None, te_slots=te_slots, from_model=True)
