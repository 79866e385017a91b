"""Helpers to build and tweak API-format prompts in tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
API_DIR = REPO / "workflows" / "api"


def load_api(name: str) -> dict:
    return json.loads((API_DIR / name).read_text())


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


def small(prompt: dict, size: int = 128, batch: int | None = None, ckpt: str | None = None) -> dict:
    """Copy of `prompt` at `size` px (latents size/8, images scaled to it), optional batch size and checkpoint name
    (with ``ckpt`` an SD1.5 stand-in, the SDXL stand-in LoRA names become their SD1.5 twins)."""
    p = copy.deepcopy(prompt)
    for n in p.values():
        ins = n["inputs"]
        if n["class_type"] in ("EmptyLatentImage", "ImageScale"):
            ins["width"] = ins["height"] = size
            if batch is not None and "batch_size" in ins:
                ins["batch_size"] = batch
        if ckpt and n["class_type"] == "CheckpointLoaderSimple":
            ins["ckpt_name"] = ckpt
        if ckpt and "sd15" in ckpt:
            for key in [k for k, v in ins.items() if isinstance(v, str) and v.endswith(".safetensors")]:
                if key != "ckpt_name":
                    ins[key] = ins[key].replace("sdxl", "sd15")
    return p
