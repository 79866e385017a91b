"""lora.fuse: one-GEMM fusion, conv/LoCon, LoHa/LoKr/DoRA against independent formulas, one rounding."""
from __future__ import annotations
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _unet_keys import node_deltas  # noqa: E402

from fewstep.lora.adapters import BiasDiffModule, DiffModule, LohaModule, LokrModule, LoraModule  # noqa: E402
from fewstep.lora.fuse import key_delta  # noqa: E402

G = torch.Generator().manual_seed(1234)


def rn(*s):
    return torch.randn(*s, generator=G)


def lora(name, down, up, alpha=None, mid=None, dora=None):
    return LoraModule(name=name, file=f"{name}.safetensors", alpha=alpha if alpha is not None else float(down.shape[0]),
                      down=down, up=up, mid=mid, dora_scale=dora, source_keys=[name + ".lora_down.weight"])


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_gemm_fusion_equals_sum_fp64():
    shape = (64, 48)
    entries, ref = [], torch.zeros(shape, dtype=torch.float64)
    for i, (r, a, s) in enumerate([(4, 2.0, 1.0), (8, 8.0, 0.6), (16, 4.0, -0.3), (1, 1.0, 2.0)]):
        d, u = rn(r, 48), rn(64, r)
        entries.append((lora(f"m{i}", d, u, a), s))
        ref += s * a / r * (u.double() @ d.double())
    got = key_delta(entries, "k.weight", shape)
    assert got.dtype == torch.float32
    assert rel(got, ref) < 1e-6


def test_conv3x3_kohya_and_1x1():
    w = (16, 8, 3, 3)
    d, u = rn(4, 8, 3, 3), rn(16, 4, 1, 1)
    got = key_delta([(lora("c", d, u, 2.0), 1.0)], "c.weight", w)
    # sd-scripts reference: conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3)
    ref = F.conv2d(d.double().permute(1, 0, 2, 3), u.double()).permute(1, 0, 2, 3) * 0.5
    assert rel(got, ref) < 1e-6
    d1, u1 = rn(4, 8, 1, 1), rn(16, 4, 1, 1)
    got1 = key_delta([(lora("c1", d1, u1), 1.0)], "c1.weight", (16, 8, 1, 1))
    ref1 = (u1.double().squeeze() @ d1.double().squeeze())[..., None, None]
    assert rel(got1, ref1) < 1e-6


def test_locon_mid_tucker():
    d, mid, u = rn(4, 8, 1, 1), rn(4, 4, 3, 3), rn(16, 4, 1, 1)
    got = key_delta([(lora("t", d, u, 4.0, mid=mid), 1.0)], "t.weight", (16, 8, 3, 3))
    # as a conv chain: x -> down(1x1) -> mid(3x3) -> up(1x1); composite kernel
    ref = torch.einsum("oa,abkl,bi->oikl", u.double()[:, :, 0, 0], mid.double(), d.double()[:, :, 0, 0])
    assert rel(got, ref) < 1e-6


def test_loha_lokr_independent():
    w1a, w1b, w2a, w2b = rn(12, 3), rn(3, 10), rn(12, 3), rn(3, 10)
    e = LohaModule(name="h", file="h.safetensors", alpha=1.5, w1_a=w1a, w1_b=w1b, w2_a=w2a, w2_b=w2b)
    got = key_delta([(e, 0.8)], "h.weight", (12, 10))
    ref = 0.8 * 1.5 / 3 * ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()))
    assert rel(got, ref) < 1e-6
    # LoKr: W = kron(w1, w2a@w2b) * alpha/rank(w2_b)
    w1, a2, b2 = rn(2, 4), rn(6, 2), rn(2, 3)
    k = LokrModule(name="k", file="k.safetensors", alpha=1.0, w1=w1, w2_a=a2, w2_b=b2)
    got = key_delta([(k, 1.0)], "k.weight", (12, 12))
    w2 = (a2.double() @ b2.double())
    ref = torch.zeros(12, 12, dtype=torch.float64)
    for i in range(2):
        for j in range(4):
            ref[i * 6:(i + 1) * 6, j * 3:(j + 1) * 3] = w1[i, j].double() * w2
    assert rel(got, ref * 0.5) < 1e-6
    # LoKr conv: w1 [a, b], w2 [c, d, kh, kw]
    w1c, w2c = rn(2, 2), rn(3, 4, 3, 3)
    kc = LokrModule(name="kc", file="kc.safetensors", alpha=None, w1=w1c, w2=w2c)
    got = key_delta([(kc, 1.0)], "kc.weight", (6, 8, 3, 3))
    refc = torch.zeros(6, 8, 3, 3, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            refc[i * 3:(i + 1) * 3, j * 4:(j + 1) * 4] = w1c[i, j].double() * w2c.double()
    assert rel(got, refc) < 1e-6


def _dora_ref(W, dW, scale, ds, strength, base_norm_out=False):
    """LyCORIS' merged DoRA weight (base_norm_out: ComfyUI 0.3.75's norm of the base weight on the output axis)."""
    W, dW, ds = W.double(), dW.double(), ds.double()
    Wc = W + scale * dW
    if ds.shape[0] == W.shape[0]:
        src = W if base_norm_out else Wc
        n = torch.sqrt((src.reshape(src.shape[0], -1) ** 2).sum(1)).reshape(-1, *[1] * (W.dim() - 1))
    else:
        n = torch.sqrt((Wc ** 2).sum(0, keepdim=True))
    Wn = Wc * ds / (n + torch.finfo(torch.float32).eps)
    return strength * (Wn - W)


def test_dora_both_axes():
    W = rn(10, 6)
    d, u = rn(2, 6), rn(10, 2)
    for ds, strength in [(rn(1, 6).abs() + 0.5, 1.0), (rn(10, 1).abs() + 0.5, 0.7)]:
        e = lora("d", d, u, 1.0, dora=ds)
        got = key_delta([(e, strength)], "d.weight", (10, 6), base_weight_fn=lambda k: W)
        ref = _dora_ref(W, u @ d, 0.5, ds, strength)
        assert rel(got, ref) < 1e-6


def test_dora_needs_base_weight():
    e = lora("d", rn(2, 6), rn(10, 2), dora=torch.ones(1, 6))
    try:
        key_delta([(e, 1.0)], "d.weight", (10, 6))
    except ValueError as err:
        assert "d.safetensors" in str(err) and "d.weight" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_diff_and_bias_and_plan():
    shapes = {"m.a.weight": (4, 3), "m.a.bias": (4,)}
    diff = DiffModule(name="a", file="f.safetensors", diff=rn(4, 3))
    b = BiasDiffModule(name="a", file="f.safetensors", diff=rn(4))
    lo = lora("a", rn(2, 3), rn(4, 2))
    out = node_deltas([(diff, 0.5), (b, 2.0), (lo, 1.0)], shapes, {"a": "m.a.weight"})
    assert set(out) == {"m.a.weight", "m.a.bias"}
    assert rel(out["m.a.weight"], 0.5 * diff.diff.double() + lo.up.double() @ lo.down.double()) < 1e-6
    assert torch.allclose(out["m.a.bias"], 2.0 * b.diff)
    k, v = next(iter(node_deltas([(lo, 1.0)], shapes, {"a": "m.a.weight"}).items()))
    assert k == "m.a.weight"


def test_key_scale_and_one_rounding():
    from fewstep.lora.merge import merged_key_delta, plan_merge
    shape = (32, 24)
    base = rn(*shape).to(torch.float16)
    items = [(lora(f"x{i}", rn(4, 24) * 0.01, rn(32, 4) * 0.01), 1.0) for i in range(3)]
    mod2host = {e.name: "w.weight" for e, _ in items}
    deltas = node_deltas(items, {"w.weight": shape}, mod2host, key_scale=lambda e, k: 0.5)
    # what the fuse's patch does: accumulate into the host's fp32 working copy, which the host rounds once
    (key, (_, acc, present)), = plan_merge([], [items], {"w.weight": shape}, mod2host,
                                           style_key_scale=lambda e, k: 0.5).items()
    work = base.float().contiguous()
    merged_key_delta(key, shape, acc, present, out=work)
    fused = work.to(base.dtype)
    assert fused.dtype == torch.float16
    exact = sum(0.5 * (e.up.double() @ e.down.double()) for e, _ in items)
    assert torch.equal(fused, (base.float() + deltas["w.weight"]).to(torch.float16))
    # one rounding of the fp32 sum equals rounding the fp64 truth (except at exact ties, absent here)
    assert (fused.float() - (base.double() + exact).to(torch.float16).float()).abs().max() <= \
        torch.finfo(torch.float16).eps * base.float().abs().max()
    # sequential per-adapter rounding (diffusers-style) is generally different
    seq = base.clone()
    for e, _ in items:
        seq = (seq.float() + 0.5 * (e.up @ e.down)).to(torch.float16)
    assert (fused.float() - (base.double() + exact).float()).abs().sum() <= \
        (seq.float() - (base.double() + exact).float()).abs().sum()


def _outcome(fn):
    try:
        fn()
        return None
    except (ValueError, RuntimeError) as e:
        return type(e).__name__


def test_fast_shape_check_agrees_with_computing():
    """check_key_shapes (tensor shapes only) accepts exactly what key_delta can compute and rejects the rest with
    a ValueError naming the file and the source key (key_delta itself may fail later with a bare RuntimeError)."""
    from fewstep.lora.fuse import check_key_shapes
    cases = [
        ([lora("a", rn(4, 48), rn(64, 4))], (64, 48)),                                   # fits
        ([lora("a", rn(4, 48), rn(64, 4))], (64, 47)),                                   # wrong in
        ([lora("a", rn(4, 48), rn(64, 4))], (63, 48)),                                   # wrong out
        ([lora("a", rn(4, 48), rn(64, 4))], (64,)),                                      # 1-D target
        ([lora("c", rn(4, 8, 3, 3), rn(16, 4, 1, 1))], (16, 8, 3, 3)),                   # conv fits
        ([lora("c", rn(4, 8, 3, 3), rn(16, 4, 1, 1))], (16, 8, 1, 1)),                   # kernel size wrong
        ([lora("c", rn(4, 8, 1, 1), rn(16, 4, 3, 3))], (16, 8, 1, 1)),                   # kxk up: rank mismatch
        ([lora("t", rn(4, 8, 1, 1), rn(16, 4, 1, 1), mid=rn(4, 4, 3, 3))], (16, 8, 3, 3)),  # Tucker fits
        ([lora("t", rn(4, 8, 1, 1), rn(16, 4, 1, 1), mid=rn(4, 4, 3, 3))], (16, 8, 1, 1)),  # Tucker wrong k
        ([lora("t", rn(4, 8, 1, 1), rn(16, 4, 1, 1), mid=rn(4, 5, 3, 3))], (16, 8, 3, 3)),  # Tucker bad mid
        ([lora("a", rn(4, 48), rn(64, 4)), lora("b", rn(8, 48), rn(64, 8))], (64, 48)),  # two fit
        ([lora("a", rn(4, 48), rn(64, 4)), lora("b", rn(8, 40), rn(64, 8))], (64, 48)),  # second wrong
        ([DiffModule(name="d", file="d.safetensors", diff=rn(64, 48))], (64, 48)),
        ([DiffModule(name="d", file="d.safetensors", diff=rn(64, 40))], (64, 48)),
    ]
    for entries, shape in cases:
        items = [(e, 0.7) for e in entries]
        fast = _outcome(lambda: check_key_shapes(items, "k.weight", shape))
        real = _outcome(lambda: key_delta(items, "k.weight", shape))
        assert (fast is None) == (real is None), (entries[-1].name, shape, fast, real)
        if fast is not None:
            assert fast == "ValueError"
            try:
                check_key_shapes(items, "k.weight", shape)
            except ValueError as e:
                assert ".safetensors" in str(e) and ("k.weight" in str(e) or "mid" in str(e) or "rank" in str(e))
    # strength 0 entries are skipped by both
    bad = [(lora("a", rn(4, 48), rn(64, 4)), 0.0)]
    check_key_shapes(bad, "k.weight", (63, 48))


# ---------------------------------------------------------------- PEFT / diffusers DoRA (lora_magnitude_vector)

def peft_dora(name, down, up, alpha, magnitude):
    return LoraModule(name=name, file=f"{name}.safetensors", alpha=alpha, down=down, up=up, dora_scale=magnitude,
                      dora_norm="peft", source_keys=[f"{name}.lora_A.weight", f"{name}.lora_B.weight",
                                                     f"{name}.lora_magnitude_vector"])


def _peft_dora_ref(W, down, up, scaling, m, strength):
    """PEFT's DoRA merge in float64: W' = (m / ‖W + s·BA‖_row) · (W + s·BA); delta = t·(W' − W)."""
    W = W.double()
    if W.dim() == 4:  # PEFT Conv2d get_delta_weight: conv2d(A.permute(1,0,2,3), B).permute(1,0,2,3)
        dW = F.conv2d(down.double().permute(1, 0, 2, 3), up.double()).permute(1, 0, 2, 3)
    else:
        dW = up.double() @ down.double()
    Wc = W + scaling * dW
    norm = torch.linalg.vector_norm(Wc, ord=2, dim=tuple(range(1, W.dim())))  # combined weight, per output channel
    factor = m.double().reshape(-1) / (norm + torch.finfo(torch.float32).eps)
    return strength * (factor.view(-1, *[1] * (W.dim() - 1)) * Wc - W)


def _peft_cases():
    """(key, W, down, up, magnitude as PEFT stores it): Linear 24x40 and Conv2d 16x8x3x3, rank 4."""
    W = rn(24, 40)
    d, u = rn(4, 40) * 0.3, rn(24, 4) * 0.3
    m = torch.linalg.vector_norm(W, dim=1) * (1 + 0.3 * torch.rand(24, generator=G))  # [out]
    Wc = rn(16, 8, 3, 3)
    dc, uc = rn(4, 8, 3, 3) * 0.3, rn(16, 4, 1, 1) * 0.3
    mc = (torch.linalg.vector_norm(Wc, dim=(1, 2, 3)) * (1 + 0.3 * torch.rand(16, generator=G))).view(1, 16, 1, 1)
    return [("lin.weight", W, d, u, m), ("conv.weight", Wc, dc, uc, mc)]


def test_peft_dora_matches_peft_formula_and_kohya_out_axis():
    for key, W, d, u, m in _peft_cases():
        e = peft_dora("p", d, u, 8.0, m)  # alpha 8 / rank 4: scaling 2
        assert e.scale == 2.0
        kohya = lora("k", d, u, 8.0, dora=m.reshape(W.shape[0], *[1] * (W.dim() - 1)))  # same magnitude, kohya form
        for t in (1.0, 0.6):
            got = key_delta([(e, t)], key, W.shape, base_weight_fn=lambda k: W)
            ref = _peft_dora_ref(W, d, u, 2.0, m, t)
            assert got.dtype == torch.float32 and got.shape == W.shape
            assert rel(got, ref) < 1e-6, (key, t, rel(got, ref))
            # LyCORIS' [out, 1] dora_scale normalises the merged weight per output row, as PEFT does: the same
            # result (ComfyUI 0.3.75 normalises the base weight there: tests/math/test_lora_dora.py)
            lyco = key_delta([(kohya, t)], key, W.shape, base_weight_fn=lambda k: W)
            assert rel(lyco, got) < 1e-6, (key, t, rel(lyco, got))


def test_peft_dora_at_alpha_equal_rank():
    for key, W, d, u, m in _peft_cases():
        e = peft_dora("p", d, u, 4.0, m)
        default = key_delta([(e, 0.8)], key, W.shape, base_weight_fn=lambda k: W)
        assert rel(default, _peft_dora_ref(W, d, u, 1.0, m, 0.8)) < 1e-6


def test_peft_dora_magnitude_shapes_and_wrong_length():
    from fewstep.lora.fuse import check_key_shapes
    key, W, d, u, m = _peft_cases()[1]  # conv, 16 output channels
    ref = key_delta([(peft_dora("p", d, u, 4.0, m), 1.0)], key, W.shape, base_weight_fn=lambda k: W)
    for form in (m.reshape(16), m.reshape(16, 1, 1, 1)):  # all accepted stored forms give the same delta
        got = key_delta([(peft_dora("p", d, u, 4.0, form), 1.0)], key, W.shape, base_weight_fn=lambda k: W)
        assert torch.equal(got, ref)
    for bad in (torch.ones(15), torch.ones(1, 17, 1, 1), torch.ones(2, 8)):  # wrong length / not one axis
        e = peft_dora("p", d, u, 4.0, bad)
        for fn in (lambda: key_delta([(e, 1.0)], key, W.shape, base_weight_fn=lambda k: W),
                   lambda: check_key_shapes([(e, 1.0)], key, W.shape)):  # the up-front check agrees
            try:
                fn()
            except ValueError as err:
                msg = str(err)
                assert "p.safetensors" in msg and "p.lora_magnitude_vector" in msg and key in msg, msg
                assert str(tuple(bad.shape)) in msg and str(tuple(W.shape)) in msg, msg
            else:
                raise AssertionError(f"expected ValueError for magnitude {tuple(bad.shape)}")
    check_key_shapes([(peft_dora("p", d, u, 4.0, m), 1.0)], key, W.shape)  # a fitting entry passes
    try:
        check_key_shapes([(peft_dora("p", d, u, 4.0, m), 1.0)], key, (16, 8, 1, 1))  # factors checked too
    except ValueError as err:
        assert "p.safetensors" in str(err)
    else:
        raise AssertionError("expected ValueError for a kernel-size mismatch")
