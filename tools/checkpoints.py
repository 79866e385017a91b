"""Validation of a user checkpoint for `make demo CHECKPOINT=...`: exists, safetensors, SD1.5 or SDXL."""
from __future__ import annotations

from pathlib import Path

from tools.hostenv import HostError


def detect_base(path: Path) -> str:
    """'sd15' or 'sdxl' from the UNet tensor shapes in the safetensors header (no weights are read)."""
    if not path.is_file():
        raise HostError(f"CHECKPOINT={path} does not exist")
    if path.suffix != ".safetensors":
        raise HostError(f"CHECKPOINT={path} is not a .safetensors file; fewstep never unpickles .ckpt/.pt files. "
                        "Convert it to safetensors first.")
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            ctx = None
            k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
            k_xl = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
            for key in (k, k_xl):
                if key in keys:
                    ctx = f.get_slice(key).get_shape()[1]
                    break
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise HostError(f"CHECKPOINT={path} is not a readable safetensors file: {e}") from None
    if "model.diffusion_model.label_emb.0.0.weight" in keys and ctx == 2048:
        return "sdxl"
    if ctx == 768 and "model.diffusion_model.label_emb.0.0.weight" not in keys:
        return "sd15"
    raise HostError(f"CHECKPOINT={path} is not an SD1.5 or SDXL checkpoint (cross-attention width {ctx}); "
                    "fewstep's demo needs one of those")
