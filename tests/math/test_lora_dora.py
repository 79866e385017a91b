"""DoRA as the trainers train it (LyCORIS ``apply_weight_decompose``, PEFT ``dora.py``), within one rounding.

The reference is LyCORIS' merge written out in float64 from its source (``lycoris/modules/locon.py``):
W' = W + (alpha/rank)·up@down, n = ‖W'‖ over every axis but the one ``dora_scale`` keeps ([out, 1, …]: per output
row, LyCORIS' default since 2025; [1, in, …]: per input column), D = W'·dora_scale/(n + eps_fp32); at strength s the
fuse gives W + s·(D − W) (ComfyUI's convention), LyCORIS' multiplier W' + s·(D − W'), PEFT's weight
m·(W + sΔW)/‖W + sΔW‖ -- all D at s = 1.
"""
from __future__ import annotations
import pytest
import torch

from fewstep.lora.adapters import LoraModule
from fewstep.lora.fuse import DORA_CONVENTIONS, check_key_shapes, dora_weight, key_delta

EPS = torch.finfo(torch.float32).eps


def _case(axis: int, conv: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (24, 16, 3, 3) if conv else (48, 40)
    w = torch.randn(shape, generator=g) / shape[1] ** 0.5
    rank = 4
    down = torch.randn(rank, *shape[1:], generator=g) * 0.3
    up = torch.randn(shape[0], rank, *([1, 1] if conv else []), generator=g) * 0.3
    if axis == 0:
        mag = torch.linalg.vector_norm(w.reshape(shape[0], -1), dim=1).reshape(shape[0], *[1] * (len(shape) - 1))
    else:
        mag = torch.linalg.vector_norm(w.transpose(0, 1).reshape(shape[1], -1), dim=1)
        mag = mag.reshape(1, shape[1], *[1] * (len(shape) - 2))
    mag = mag * (1 + 0.2 * torch.rand(mag.shape, generator=g))
    e = LoraModule(name="m", file="dora.safetensors", alpha=8.0, down=down, up=up, dora_scale=mag,
                   source_keys=["m.lora_down.weight", "m.lora_up.weight", "m.dora_scale"])
    return w, e


def lycoris_merged(w, e, multiplier=1.0):
    """LyCORIS get_merged_weight in float64 (wd_on_out from the dora_scale shape)."""
    w64 = w.double()
    diff = (e.up.double().reshape(e.up.shape[0], -1) @ e.down.double().reshape(e.down.shape[0], -1)).reshape(w.shape)
    merged = w64 + diff * (e.alpha / e.down.shape[0])
    if e.dora_scale.shape[0] == w.shape[0]:
        norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1)) + EPS
    else:
        norm = (merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)) + EPS
    scale = e.dora_scale.double() / norm
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return merged * scale


def comfy_base_norm(w, e, strength):
    """ComfyUI 0.3.75 weight_decompose for a [out, 1] dora_scale: the norm of the base weight."""
    w64 = w.double()
    diff = (e.up.double().reshape(e.up.shape[0], -1) @ e.down.double().reshape(e.down.shape[0], -1)).reshape(w.shape)
    calc = w64 + diff * (e.alpha / e.down.shape[0])
    norm = w64.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1)) + EPS
    return w64 + strength * (calc * (e.dora_scale.double() / norm) - w64)


def fused(w, e, strength, dtype):
    """What the host stores: the fp32 working copy of the ``dtype`` weight plus the fuse's delta (key_delta with
    out=, as FewStep LoRA Fuse's patch runs it), rounded into ``dtype``."""
    stored = w.to(dtype).clone()
    work = stored.float().clone()
    key_delta([(e, strength)], "m.weight", w.shape, base_weight_fn=lambda k: stored.float(), out=work)
    return stored, work.to(dtype)


@pytest.mark.parametrize("axis", [0, 1], ids=["out_1", "1_in"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dora_equals_lycoris_within_one_rounding(axis, conv, dtype):
    w, e = _case(axis, conv)
    stored, got = fused(w, e, 1.0, dtype)
    exact = lycoris_merged(stored.float(), e)
    want = exact.to(dtype)
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
    err = (got.double() - exact).abs()
    # fp32: rounded once from float64; fp16: the host rounds the fp32 sum (adds at most half an fp32 ulp)
    assert (err <= 0.5 * ulp * (1 + 2 ** -10)).all(), err.max()
    assert (got == want).float().mean() > 0.99


def test_comfyui_base_norm_is_a_few_percent_of_the_delta_off():
    """The [out, 1] case: ComfyUI 0.3.75 normalises the base weight, which differs from what LyCORIS trained by
    percent of the delta -- the fuse follows LyCORIS."""
    w, e = _case(0)
    stored, got = fused(w, e, 1.0, torch.float32)
    exact = lycoris_merged(stored, e)
    delta = (exact - stored.double()).norm()
    off = (comfy_base_norm(stored, e, 1.0) - exact).norm() / delta
    assert off > 0.01, off
    assert (got.double() - exact).norm() / delta < 1e-6


@pytest.mark.parametrize("axis", [0, 1])
def test_strength_conventions(axis):
    w, e = _case(axis, seed=3)
    d = lycoris_merged(w, e)
    w64 = w.double()
    delta = (e.up.double() @ e.down.double()) * (e.alpha / e.down.shape[0])
    for s in (0.0, 0.4, 1.0, 1.3):
        ours = dora_weight(e, "m.weight", w, s)
        assert torch.allclose(ours, w64 + s * (d - w64), rtol=0, atol=1e-12)
        lyco = dora_weight(e, "m.weight", w, s, "lycoris")
        assert torch.allclose(lyco, lycoris_merged(w, e, s), rtol=0, atol=1e-12)  # LyCORIS' own multiplier
        peft = dora_weight(e, "m.weight", w, s, "peft")
        ws = w64 + s * delta
        if axis == 0:
            n = ws.norm(dim=1, keepdim=True)
        else:
            n = ws.norm(dim=0, keepdim=True)
        assert torch.allclose(peft, ws * e.dora_scale.double() / (n + EPS), rtol=0, atol=1e-12)
    for conv in DORA_CONVENTIONS:
        assert torch.allclose(dora_weight(e, "m.weight", w, 1.0, conv), d, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="convention"):
        dora_weight(e, "m.weight", w, 1.0, "other")


@pytest.mark.parametrize("bad", [(48,), (1, 40, 1), (40, 1), (1, 48), (2, 40)])
def test_dora_shape_checked_up_front(bad):
    """A dora_scale that is neither [out, 1] nor [1, in] is refused by the up-front check (the fuse node's), naming
    the file, the tensor, both shapes and the two shapes it may have."""
    w, e = _case(0)
    e.dora_scale = torch.ones(bad)
    with pytest.raises(ValueError) as err:
        check_key_shapes([(e, 1.0)], "m.weight", w.shape)
    msg = str(err.value)
    assert "dora.safetensors" in msg and "m.dora_scale" in msg and str(tuple(bad)) in msg, msg
    assert "(48, 1)" in msg and "(1, 40)" in msg, msg
    with pytest.raises(ValueError):
        key_delta([(e, 1.0)], "m.weight", w.shape, base_weight_fn=lambda k: w)


def test_dora_key_sums_in_float64_and_rounds_once():
    """On a weight with a DoRA entry, every delta (a plain LoRA's included) is summed in float64 with the weight and
    rounded once."""
    w, e = _case(0, seed=5)
    g = torch.Generator().manual_seed(9)
    plain = LoraModule(name="p", file="p.safetensors", alpha=4.0, down=torch.randn(4, 40, generator=g) * 0.2,
                       up=torch.randn(48, 4, generator=g) * 0.2)
    work = w.clone()
    key_delta([(e, 0.8), (plain, 0.5)], "m.weight", w.shape, base_weight_fn=lambda k: w.clone(), out=work)
    exact = (w.double() + 0.8 * (lycoris_merged(w, e) - w.double())
             + 0.5 * (plain.up.double() @ plain.down.double()))
    err = (work.double() - exact).abs()
    assert (err <= 0.5 * torch.finfo(torch.float32).eps * exact.abs() * (1 + 1e-6) + 1e-30).all(), err.max()
