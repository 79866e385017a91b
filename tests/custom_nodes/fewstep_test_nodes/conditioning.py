"""Text-encoder outputs for the flow-matching families, drawn from a seed: replaces the text encoders in tests only.

T5-XXL, umT5-XXL, Qwen2.5-VL 7B and llava-llama-3 8B are far too large for CI, and no weights may be downloaded,
so tests feed the stand-in models (tools/standins) a CONDITIONING with the shapes and keys core's
``CLIPTextEncode`` gives for each family's real encoder, filled with seeded N(0, 1) values.  Nothing here ships in
the pack.

family          cross_attn (tokens x width)            pooled_output               real encoder (padded length)
sd3             L x 4096  (CLIP-L/G 2048 padded + T5)  2048 (CLIP-L 768 + G 1280)  CLIP-L, CLIP-G, T5-XXL (154)
flux            L x 4096  (T5-XXL)                     768 (CLIP-L)                T5-XXL + CLIP-L (256)
wan, wan22_5b   L x 4096  (umT5-XXL)                   --                          umT5-XXL (512)
qwen_image      L x 3584  (Qwen2.5-VL hidden states)   --                          Qwen2.5-VL 7B (prompt length)
hunyuan_video   L x 4096  (llava-llama-3 hidden)       768 (CLIP-L)                llava-llama-3 8B + CLIP-L

Guidance is not part of a text encoder's output: Flux and HunyuanVideo read it from core ``FluxGuidance``
(the host uses 3.5 / 6.0 when it is absent), as in the real workflows.
"""
from __future__ import annotations

import torch

# family -> (cross-attention width, pooled width or None, the padded token count of the real encoder)
FAMILIES = {
    "sd3": (4096, 2048, 154),
    "flux": (4096, 768, 256),
    "wan": (4096, None, 512),
    "wan22_5b": (4096, None, 512),
    "qwen_image": (3584, None, 0),
    "hunyuan_video": (4096, 768, 0),
}
DEFAULT_TOKENS = 16


def make_conditioning(family: str, seed: int, tokens: int = DEFAULT_TOKENS, batch: int = 1) -> list:
    """[[cross_attn, {"pooled_output": ...}]] as core CLIPTextEncode returns it for `family`'s real encoder."""
    if family not in FAMILIES:
        raise ValueError(f"FewStepTestConditioning: unknown family {family!r}; choose from {tuple(FAMILIES)}")
    width, pooled, real_len = FAMILIES[family]
    n = tokens if tokens > 0 else (real_len or DEFAULT_TOKENS)
    g = torch.Generator().manual_seed(int(seed))
    cond = torch.randn((batch, n, width), generator=g)
    extra = {}
    if pooled is not None:
        extra["pooled_output"] = torch.randn((batch, pooled), generator=g)
    return [[cond, extra]]
