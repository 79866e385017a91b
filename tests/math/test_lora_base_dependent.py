"""GLoRA, OFT/BOFT and IA3 (LyCORIS, sd-scripts OFT): parsing and deltas against independent references.

The references here are written from the trainers' definitions (LyCORIS ``glora``/``diag_oft``/``boft``/``ia3``,
sd-scripts ``networks/oft.py``) with explicit matrices (``torch.block_diag``, permutation matrices built
element by element), not with the reshapes ``lora.adapters`` uses.
"""
from __future__ import annotations

import pytest
import torch

from fewstep.lora.adapters import GloraModule, Ia3Module, OftModule
from fewstep.lora.formats import parse_state_dict
from fewstep.lora.fuse import check_key_shapes, key_delta
from fewstep.lora.keys import canonical

F = "style.safetensors"


def entry(sd, meta=None):
    ad = parse_state_dict(sd, meta or {}, F)
    assert len(ad.entries) == 1, ad.summary()
    return ad.entries[0]


def delta(e, shape, w, s=1.0):
    return key_delta([(e, s)], "k.weight", shape, base_weight_fn=lambda k: w)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed)) * scale


# ---------------------------------------------------------------- parsing

def test_parse_kinds_and_unknown_weight():
    sd = {"lora_unet_a.a1.weight": rnd(6, 2), "lora_unet_a.a2.weight": rnd(2, 6), "lora_unet_a.b1.weight": rnd(8, 2),
          "lora_unet_a.b2.weight": rnd(2, 6), "lora_unet_a.alpha": torch.tensor(1.0),
          "lora_unet_b.oft_blocks": rnd(2, 4, 4), "lora_unet_b.alpha": torch.tensor(1e-3),
          "lora_unet_c.oft_blocks": rnd(2, 2, 4, 4), "lora_unet_c.rescale": rnd(8, 1),
          "lora_unet_d.weight": rnd(8), "lora_unet_d.on_input": torch.tensor(1),
          "lora_unet_e.weight": rnd(8)}  # a bare .weight without .on_input is not IA3
    ad = parse_state_dict(sd, {}, F)
    kinds = {e.name: e.kind for e in ad.entries}
    assert kinds == {"lora_unet_a": "glora", "lora_unet_b": "oft", "lora_unet_c": "boft", "lora_unet_d": "ia3"}
    assert ad.unknown_keys == ["lora_unet_e.weight"]
    oft = next(e for e in ad.entries if e.kind == "oft")
    assert isinstance(oft, OftModule) and oft.alpha == pytest.approx(1e-3) and oft.scale == 1.0
    ia3 = next(e for e in ad.entries if e.kind == "ia3")
    assert isinstance(ia3, Ia3Module) and ia3.on_input is True
    with pytest.raises(ValueError, match="lora_unet_e.weight"):
        parse_state_dict(sd, {}, F, strict=True)


@pytest.mark.parametrize("sd, msg", [
    ({"m.a1.weight": rnd(6, 2), "m.a2.weight": rnd(2, 6), "m.b1.weight": rnd(8, 2)},
     r"GLoRA module 'm' lacks 'm.b2.weight'"),
    ({"m.oft_blocks": rnd(4, 4)}, r"'m.oft_blocks' has shape \(4, 4\)"),
    ({"m.oft_blocks": rnd(2, 4, 4), "m.dora_scale": rnd(8, 1)}, r"combines DoRA \('m.dora_scale'\) with OFT"),
    ({"m.weight": rnd(8), "m.on_input": torch.tensor([0, 1])}, r"'m.on_input' must be a scalar"),
    ({"m.on_input": torch.tensor(0)}, r"IA3 module 'm' lacks 'm.weight'"),
])
def test_parse_errors_name_file_and_key(sd, msg):
    with pytest.raises(ValueError, match=rf"^{F}: .*" + msg):
        parse_state_dict(sd, {}, F)


def test_sd_scripts_oft_prefix_canonical():
    assert canonical("oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") == \
        canonical("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")


# ---------------------------------------------------------------- GLoRA

@pytest.mark.parametrize("shape", [(10, 6), (10, 6, 3, 3), (7, 5, 1, 1)])
@pytest.mark.parametrize("alpha", [4.0, 0.0])
def test_glora_matches_lycoris_formula(shape, alpha):
    out, inn, r = shape[0], shape[1], 3
    k = shape[2:]
    one = [1, 1] if k else []
    w = rnd(*shape, seed=1)
    sd = {"m.a1.weight": rnd(inn, r, *one, seed=2), "m.a2.weight": rnd(r, inn, *one, seed=3),
          "m.b1.weight": rnd(out, r, *one, seed=4), "m.b2.weight": rnd(r, inn, *k, seed=5),
          "m.alpha": torch.tensor(alpha)}
    e = entry(sd)
    assert isinstance(e, GloraModule) and e.rank == r
    # LyCORIS make_weight: (W·a1·a2 + b1·b2) · alpha / r  (alpha 0 -> rank), contraction over W's input axis
    a1, a2 = sd["m.a1.weight"].reshape(inn, r), sd["m.a2.weight"].reshape(r, inn)
    a = (a1.double() @ a2.double())
    wa = torch.einsum("oi...,ij->oj...", w.double(), a)
    b = (sd["m.b1.weight"].reshape(out, r).double() @ sd["m.b2.weight"].reshape(r, -1).double()).reshape(shape)
    scale = (alpha or r) / r
    for s in (1.0, -0.7):
        ref = s * scale * (wa + b)
        got = delta(e, shape, w, s)
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_glora_old_layout():
    w = rnd(8, 6, seed=1)
    r = 2
    sd = {"m.a1.weight": rnd(r, 6, seed=2), "m.a2.weight": rnd(6, r, seed=3), "m.b1.weight": rnd(r, 6, seed=4),
          "m.b2.weight": rnd(8, r, seed=5), "m.alpha": torch.tensor(1.0)}
    e = entry(sd)
    ref = ((w.double() @ sd["m.a2.weight"].double()) @ sd["m.a1.weight"].double()
           + sd["m.b2.weight"].double() @ sd["m.b1.weight"].double()) * (1.0 / r)
    assert torch.allclose(delta(e, (8, 6), w).double(), ref, atol=1e-5)


def test_glora_without_common_rank_is_an_error():
    e = entry({"m.a1.weight": rnd(6, 2), "m.a2.weight": rnd(3, 6), "m.b1.weight": rnd(8, 2), "m.b2.weight": rnd(2, 6)})
    with pytest.raises(ValueError, match=r"style.safetensors: GLoRA module 'm' .* share no rank"):
        delta(e, (8, 6), rnd(8, 6))


# ---------------------------------------------------------------- OFT / BOFT

def cayley_ref(blocks, limit):
    q = (blocks - blocks.transpose(-1, -2)).double()
    n = q.norm().item()
    if limit > 0 and n + 1e-8 > limit:
        q = q * limit / (n + 1e-8)
    eye = torch.eye(blocks.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


@pytest.mark.parametrize("shape", [(12, 5), (12, 4, 3, 3)])
def test_oft_matches_block_diagonal_reference(shape):
    k, n = 3, 4
    w = rnd(*shape, seed=1)
    blocks = rnd(k, n, n, seed=2, scale=0.3)
    rescale = rnd(shape[0], *[1] * (len(shape) - 1), seed=3, scale=0.1) + 1.0
    for resc in (None, rescale):
        sd = {"m.oft_blocks": blocks, "m.alpha": torch.tensor(0.0)}
        if resc is not None:
            sd["m.rescale"] = resc
        e = entry(sd)
        r = torch.block_diag(*cayley_ref(blocks, 0.0))  # [out, out]
        # sd-scripts merge_to: W' = einsum("oi..., op -> pi...", W, R) = Rᵀ W; LyCORIS: then rescale ⊙ W'
        merged = (r.T @ w.double().reshape(shape[0], -1)).reshape(shape)
        if resc is not None:
            merged = merged * resc.double()
        for s in (1.0, 0.5):
            ref = s * (merged - w.double())
            got = delta(e, shape, w, s)
            assert torch.allclose(got.double(), ref, atol=2e-5 * ref.abs().max().item()), (resc is None, s)


def test_oft_constraint_is_alpha_times_out_dim():
    out, k, n = 16, 4, 4
    w = rnd(out, 6, seed=1)
    blocks = rnd(k, n, n, seed=2, scale=0.5)
    qn = (blocks - blocks.transpose(-1, -2)).norm().item()
    free = delta(entry({"m.oft_blocks": blocks}), (out, 6), w)
    # alpha < ||Q|| < alpha·out: the trainers (LyCORIS, sd-scripts) do not clamp -> same as no constraint
    a_mid = 0.5 * qn / out * 4
    assert a_mid < qn < a_mid * out
    mid = delta(entry({"m.oft_blocks": blocks, "m.alpha": torch.tensor(a_mid)}), (out, 6), w)
    assert torch.equal(mid, free)
    # ||Q|| > alpha·out: Q is scaled to norm alpha·out
    a_small = 0.25 * qn / out
    got = delta(entry({"m.oft_blocks": blocks, "m.alpha": torch.tensor(a_small)}), (out, 6), w)
    r = torch.block_diag(*cayley_ref(blocks, a_small * out))
    ref = r.T @ w.double() - w.double()
    assert torch.allclose(got.double(), ref, atol=1e-5 * ref.abs().max().item())
    assert not torch.allclose(got, free, atol=1e-3)


def perm_matrix(out, half):
    """Butterfly stage permutation as a matrix, element by element: inside each group of 2·half rows,
    new row 2j + t takes old row t·half + j."""
    p = torch.zeros(out, out, dtype=torch.float64)
    for g0 in range(0, out, 2 * half):
        for j in range(half):
            for t in range(2):
                p[g0 + 2 * j + t, g0 + t * half + j] = 1.0
    return p


@pytest.mark.parametrize("shape", [(16, 5), (16, 3, 3, 3)])
def test_boft_matches_butterfly_matrix_reference(shape):
    out = shape[0]
    m, b = 2, 4
    k = out // b
    w = rnd(*shape, seed=1)
    blocks = rnd(m, k, b, b, seed=2, scale=0.3)
    rescale = rnd(out, *[1] * (len(shape) - 1), seed=3, scale=0.1) + 1.0
    e = entry({"m.oft_blocks": blocks, "m.rescale": rescale, "m.alpha": torch.tensor(0.0)})
    rs = cayley_ref(blocks, 0.0)  # [m, k, b, b]
    x = w.double().reshape(out, -1)
    for i in range(m):
        p = perm_matrix(out, 2 ** i * (b // 2))
        x = p.T @ torch.block_diag(*rs[i]) @ p @ x  # R applied (not transposed), as LyCORIS boft
    ref = (x.reshape(shape) * rescale.double()) - w.double()
    got = delta(e, shape, w)
    assert torch.allclose(got.double(), ref, atol=2e-5 * ref.abs().max().item())
    assert torch.allclose(delta(e, shape, w, -0.3).double(), -0.3 * ref, atol=2e-5 * ref.abs().max().item())


def test_boft_rows_must_split_into_stage_groups():
    e = entry({"m.oft_blocks": rnd(3, 3, 4, 4)})  # stage 1 needs groups of 8 rows; 12 rows do not split
    with pytest.raises(ValueError, match=r"BOFT module 'm' stage 1 .* groups of 8"):
        delta(e, (12, 5), rnd(12, 5))


# ---------------------------------------------------------------- IA3

@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3, 3)])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_scales_one_axis(shape, on_input):
    w = rnd(*shape, seed=1)
    dim = shape[1] if on_input else shape[0]
    stored = rnd(dim, seed=2) if len(shape) == 2 else rnd(1, dim, 1, 1, seed=2)
    e = entry({"m.weight": stored, "m.on_input": torch.tensor(int(on_input))})
    v = stored.reshape(-1)
    ref = torch.empty(shape)
    for o in range(shape[0]):
        for i in range(shape[1]):
            ref[o, i] = w[o, i] * (v[i] if on_input else v[o])
    assert torch.allclose(delta(e, shape, w, 0.5), 0.5 * ref, atol=1e-6)


# ---------------------------------------------------------------- shape checks (fuse-time, no compute)

@pytest.mark.parametrize("sd, msg", [
    ({"m.oft_blocks": rnd(2, 4, 4)},
     r"'m.oft_blocks' holds 2 blocks of 4 rows \(8 output channels\) but model weight 'k.weight'"),
    ({"m.oft_blocks": rnd(1, 2, 4, 4)}, r"'m.oft_blocks' holds 2 blocks of 4 rows"),
    ({"m.weight": rnd(7), "m.on_input": torch.tensor(0)}, r"IA3 'm.weight' has 7 values .* 9 output channels"),
    ({"m.a1.weight": rnd(5, 2), "m.a2.weight": rnd(2, 5), "m.b1.weight": rnd(9, 2), "m.b2.weight": rnd(2, 5)},
     r"'m.a1.weight' gives a delta of shape"),
])
def test_check_key_shapes_names_file_and_key(sd, msg):
    e = entry(sd)
    with pytest.raises(ValueError, match=rf"^{F}: " + msg):
        check_key_shapes([(e, 1.0)], "k.weight", (9, 6))


def test_base_dependent_needs_base_weight():
    e = entry({"m.oft_blocks": rnd(2, 4, 4)})
    with pytest.raises(ValueError, match=r"'m' is OFT and needs the base weight of 'k.weight'"):
        key_delta([(e, 1.0)], "k.weight", (8, 6))
