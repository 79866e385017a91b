"""The model families LoRA fusing covers, one module each, and their one list.

Adding a family: a module here with its ``Family`` record(s) (``lora.layouts``: key layout, block layout, naming
scheme, acceleration releases), and its entry in ``FAMILIES`` below. ``nodes.common.model_base`` names the
family of a loaded model.
"""
from __future__ import annotations

from ..layouts import BlockLayout, Family
from . import flux, hunyuan_video, qwen_image, sd3, unet, wan

FAMILIES: dict[str, Family] = {f.name: f for f in (
    *unet.FAMILIES, sd3.FAMILY, flux.FAMILY, *wan.FAMILIES, qwen_image.FAMILY, hunyuan_video.FAMILY)}

UNET_KEYS = unet.KEYS


def family(name: str) -> Family:
    """The family record of a ``model_base`` name; ValueError naming the family when no record covers it."""
    f = FAMILIES.get(name)
    if f is not None:
        return f
    raise ValueError(f"the model's family ({name!r}) is not one LoRA fusing knows (supported: {', '.join(FAMILIES)})")


def block_layout(name: str) -> BlockLayout:
    """The block layout of family ``name`` (ValueError for a family without one)."""
    return family(name).blocks


def label(name: str) -> str:
    """The family's label for messages ("SDXL", "Flux", ...), the name itself when unknown."""
    f = FAMILIES.get(name)
    return f.label if f else name
