"""Tier b: storage dtypes. fp8 (e4m3fn, e5m2), bf16 and fp16 weights get ONE rounding of W + Σ sᵢΔWᵢ -- the host's
own rounding (stochastic for fp8, seeded per weight; round-to-nearest for bf16/fp16) of the fp32 sum -- and unpatch
bit-exactly; a weak style LoRA on fp8 keeps its gain, which rounding after each LoRA would lose."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _dit  # noqa: E402

pytestmark = pytest.mark.host

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16]
ACCEL = [("diffusion_model.blocks.0.self_attn.q", "blocks.0.self_attn.q", None),
         ("diffusion_model.blocks.0.ffn.0", "blocks.0.ffn.0", None),
         ("diffusion_model.blocks.1.self_attn.o", "blocks.1.self_attn.o", None),
         ("diffusion_model.blocks.1.ffn.2", "blocks.1.ffn.2", None)]
STYLE = [("transformer.blocks.0.attn1.to_q", "blocks.0.self_attn.q", None),
         ("transformer.blocks.0.ffn.net.0.proj", "blocks.0.ffn.0", None),
         ("transformer.blocks.1.attn1.to_out.0", "blocks.1.self_attn.o", None),
         ("transformer.blocks.1.ffn.net.2", "blocks.1.ffn.2", None)]


@pytest.fixture(scope="module")
def L(host):
    from fewstep.nodes import lora
    return lora


@pytest.fixture(scope="module")
def loras(host, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("dtype-loras")
    folder_paths.add_model_folder_path("loras", str(d))
    yield d
    folder_paths.folder_names_and_paths["loras"][0].remove(str(d))


def shapes(m):
    return {k: tuple(v.shape) for k, v in m.model.state_dict().items()}


def patched(m, keys):
    import comfy.utils
    try:
        for k in keys:
            m.patch_weight_to_device(k)
        return {k: comfy.utils.get_attr(m.model, k).detach().clone() for k in keys}
    finally:
        m.unpatch_model()


def current(m, keys):
    import comfy.utils
    return {k: comfy.utils.get_attr(m.model, k).detach().clone() for k in keys}


def _to_dtype_floor(x, dtype):
    r = x.to(dtype).double()
    return torch.where(r > x, _prev(r, dtype), r)


def _to_dtype_ceil(x, dtype):
    r = x.to(dtype).double()
    return torch.where(r < x, _next(r, dtype), r)


def _all_values(dtype) -> torch.Tensor:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        v = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    else:
        v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).double()
    v = v[torch.isfinite(v)]
    return torch.unique(v)


_VALUES: dict = {}


def _grid(dtype):
    if dtype not in _VALUES:
        _VALUES[dtype] = _all_values(dtype)
    return _VALUES[dtype]


def _next(r, dtype):
    g = _grid(dtype)
    i = torch.searchsorted(g, r.reshape(-1), right=True).clamp(max=len(g) - 1)
    return g[i].reshape(r.shape)


def _prev(r, dtype):
    g = _grid(dtype)
    i = (torch.searchsorted(g, r.reshape(-1), right=False) - 1).clamp(min=0)
    return g[i].reshape(r.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
def test_one_rounding_of_the_whole_sum_and_bit_exact_unpatch(L, loras, dtype):
    import comfy.float
    import comfy.model_patcher
    m0 = _dit.small_model("wan", dtype)
    sh = shapes(m0)
    a = _dit.write_lora(loras / "acc.safetensors", "wan", "native", sh, entries=ACCEL, seed=1, rank=8)
    s = _dit.write_lora(loras / "sty.safetensors", "wan", "diffusers", sh, entries=STYLE, seed=2)
    keys = list(a)
    before = current(m0, keys)
    assert all(v.dtype == dtype for v in before.values())
    m, report, _ = L.fuse(m0, "acc.safetensors", 1.0, [("sty.safetensors", 0.6)])
    got = patched(m, keys)
    for k in keys:
        exact = before[k].double() + a[k] + 0.6 * s[k]
        lo, hi = _to_dtype_floor(exact, dtype), _to_dtype_ceil(exact, dtype)
        g = got[k].double()
        assert got[k].dtype == dtype
        # the sum is formed in the host's fp32 working copy: its own rounding error, where terms cancel, can move a
        # value near a rounding boundary across it
        slack = 4 * torch.finfo(torch.float32).eps * (before[k].double().abs() + a[k].abs() + 0.6 * s[k].abs())
        half = 0.5 if dtype in (torch.bfloat16, torch.float16) else 1.0  # nearest (bf16/fp16); stochastic (fp8)
        assert ((g - exact).abs() <= half * (hi - lo) * (1 + 1e-3) + slack).all(), f"{k}: not one rounding"
        assert (((g == lo) | (g == hi)).float().mean() > 0.999), f"{k}: not a neighbour of the exact sum"
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # the host rounds fp8 stochastically, seeded per weight: exactly the host's own rounding of the sum
            w32 = before[k].float() + (a[k] + 0.6 * s[k]).float()
            ref = comfy.float.stochastic_rounding(w32, dtype, seed=comfy.model_patcher.string_to_seed(k))
            assert (got[k].double() == ref.double()).float().mean() > 0.99, k
    after = current(m0, keys)
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in keys), "unpatch"
    assert not m0.backup


def _gain(fused: torch.Tensor, base: torch.Tensor, strong: torch.Tensor, weak: torch.Tensor) -> float:
    """How much of the weak LoRA's delta the stored weight carries: <W_stored − W − Δstrong, Δweak> / ‖Δweak‖²."""
    d = fused.double() - base.double() - strong
    return float((d * weak).sum() / (weak * weak).sum())


def test_weak_lora_on_fp8_keeps_its_gain(L, loras):
    """A style LoRA whose delta is about a tenth of an fp8 step, fused with a strong acceleration LoRA: the fused fp8
    weights carry it with gain ≈ 1 (one stochastic rounding of the whole sum). Rounding after each LoRA (what a
    per-adapter fuse does: W → round(W + Δaccel) → round(· + Δstyle), nearest) keeps almost none of it."""
    dtype = torch.float8_e4m3fn
    m0 = _dit.small_model("wan", dtype, seed=3)
    sh = shapes(m0)
    a = _dit.write_lora(loras / "acc8.safetensors", "wan", "native", sh, entries=ACCEL, seed=4, rank=8)
    s = _dit.write_lora(loras / "weak8.safetensors", "wan", "diffusers", sh, entries=STYLE, seed=5)
    keys = list(a)
    before = current(m0, keys)
    step = {k: (_to_dtype_ceil(before[k].double() + 1e-12, dtype) - before[k].double()).abs() for k in keys}
    strength = 0.1 * min(float(step[k].median() / s[k].abs().median()) for k in keys)  # ~10 % of a step
    m, _, _ = L.fuse(m0, "acc8.safetensors", 1.0, [("weak8.safetensors", strength)])
    got = patched(m, keys)
    num = den = 0.0
    per_lora_num = 0.0
    for k in keys:
        weak = strength * s[k]
        num += float(((got[k].double() - before[k].double() - a[k]) * weak).sum())
        den += float((weak * weak).sum())
        once = (before[k].double() + a[k]).to(dtype)  # round after the first LoRA ...
        twice = (once.double() + weak).to(dtype)  # ... and after the second
        per_lora_num += float(((twice.double() - before[k].double() - a[k]) * weak).sum())
    gain, per_lora = num / den, per_lora_num / den
    print(f"weak LoRA gain: one rounding {gain:.3f}, rounding after each LoRA {per_lora:.3f}")
    assert abs(gain - 1.0) < 0.25, gain
    assert abs(per_lora) < 0.25, per_lora  # the measure would fail rounding after each LoRA
