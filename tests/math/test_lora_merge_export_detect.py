"""lora.merge (block weights, LiNeS, TIES, DARE), lora.export (randomized SVD), lora.detect."""
from __future__ import annotations
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _unet_keys import save  # noqa: E402

from fewstep.lora.detect import detect, match_name  # noqa: E402
from fewstep.lora.export import export_lora, full_svd_export, save_lora  # noqa: E402
from fewstep.lora.adapters import LoraModule  # noqa: E402
from fewstep.lora.formats import read_adapter  # noqa: E402
from fewstep.lora.fuse import key_delta  # noqa: E402
from fewstep.lora.families import FAMILIES  # noqa: E402
from fewstep.lora.merge import (block_of, depth_count, lines_scale, merge_deltas, merged_key_delta, plan_merge,  # noqa: E402
                        parse_block_weights, ties_combine, trim_top_k)

LAYOUTS = {f.blocks.name: f.blocks for f in FAMILIES.values()  # the block layouts (SD2 shares SD1.5's, SSD-1B SDXL's)
           if not f.blocks.from_model}  # (a DiT's depends on the model: tests/math/test_lora_dit_layouts.py)

LBW17 = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}


def test_slot_counts_and_presets():
    assert {k: v.counts for k, v in LAYOUTS.items()} == {"sd15": [17, 26], "sdxl": [12, 20]}
    for arch, n in [("sd15", 17), ("sd15", 26), ("sdxl", 12), ("sdxl", 20)]:
        bw = parse_block_weights(",".join(["0.5"] * n), arch)
        assert len(bw.values) == n
    with pytest.raises(ValueError, match="17 or 26"):
        parse_block_weights("1,1,1", "sd15")
    with pytest.raises(ValueError, match="12 or 20"):
        parse_block_weights(",".join(["1"] * 17), "sdxl")
    with pytest.raises(ValueError, match="not a number"):
        parse_block_weights("BOGUS", "sd15")
    # presets reproduce the LBW 17-value table on the 17 slots
    for name, vec in LBW17.items():
        bw = parse_block_weights(name.lower(), "sd15")
        got = [bw.weight(s) for s in LAYOUTS["sd15"].slots(17)]
        assert got == [float(x) for x in vec.split(",")], name
    xl = parse_block_weights("OUTALL", "sdxl")
    assert xl.weight("IN04") == 0 and xl.weight("OUT08") == 1 and xl.weight("BASE") == 1


def test_block_of_and_unlisted_slots():
    assert block_of("diffusion_model.input_blocks.4.1.proj_in.weight", "sd15") == "IN04"
    assert block_of("diffusion_model.middle_block.1.proj_in.weight", "sd15") == "MID"
    assert block_of("diffusion_model.output_blocks.11.1.proj_out.weight", "sd15") == "OUT11"
    # Outside the block stack: sd-scripts' get_lbw_block_index (SDXL time_embed/label_emb -> IN00, out -> OUT09;
    # SD1.x no slot, weight 1). BASE is the text encoders' slot only.
    assert block_of("diffusion_model.time_embed.0.weight", "sdxl") == "IN00"
    assert block_of("diffusion_model.label_emb.0.0.weight", "sdxl") == "IN00"
    assert block_of("diffusion_model.out.2.weight", "sdxl") == "OUT09"
    assert block_of("diffusion_model.out.2.weight", "sd15") == "" and block_of("diffusion_model.time_embed.0.weight",
                                                                                "sd15") == ""
    assert block_of("diffusion_model.input_blocks.0.0.weight", "sd15") == "IN00"
    none15, none_xl = parse_block_weights("NONE", "sd15"), parse_block_weights("NONE", "sdxl")
    assert none15.for_key("diffusion_model.time_embed.0.weight") == 1.0  # no slot: not scaled
    assert none15.for_key("diffusion_model.out.2.weight") == 1.0
    assert none_xl.for_key("diffusion_model.time_embed.0.weight") == 0.0  # follows IN00
    assert none_xl.for_key("diffusion_model.out.2.weight") == 1.0  # OUT09: no SDXL vector lists it
    xl20 = parse_block_weights(",".join(["1", "0.25"] + ["1"] * 18), "sdxl")  # IN00 = 0.25
    assert xl20.for_key("diffusion_model.label_emb.0.2.weight") == 0.25
    assert xl20.for_key("diffusion_model.input_blocks.0.0.weight") == 0.25
    with pytest.raises(ValueError, match="input block 10"):
        block_of("diffusion_model.input_blocks.10.0.in_layers.2.weight", "sdxl")
    bw = parse_block_weights(",".join(["0"] * 17), "sd15")
    assert bw.for_key("diffusion_model.input_blocks.3.0.op.weight") == 1.0  # IN03 not in the 17 slots
    assert bw.for_key("diffusion_model.input_blocks.4.0.op.weight") == 0.0


def test_lines_endpoints():
    a, b = 0.3, 0.7
    assert depth_count("sd15") == 25 and depth_count("sdxl") == 19
    assert lines_scale("diffusion_model.input_blocks.0.0.weight", "sd15", a, b) == pytest.approx(a)
    assert lines_scale("diffusion_model.output_blocks.11.1.proj_in.weight", "sd15", a, b) == pytest.approx(a + b)
    assert lines_scale("diffusion_model.middle_block.1.proj_in.weight", "sd15", a, b) == pytest.approx(a + b / 2)
    assert lines_scale("diffusion_model.output_blocks.8.1.proj_in.weight", "sdxl", a, b) == pytest.approx(a + b)
    assert lines_scale("diffusion_model.time_embed.0.weight", "sdxl", a, b) == pytest.approx(a)


def test_ties_hand_example():
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.1, -0.5])
    t2 = torch.tensor([-4.0, 1.0, 2.0, 0.2, 0.4])
    t3 = torch.tensor([2.0, -1.0, -0.5, 0.3, 3.0])
    # density 0.6 -> keep top 3 by |x| of each
    assert torch.equal(trim_top_k(t1, 0.6), torch.tensor([1.0, -2.0, 3.0, 0.0, 0.0]))
    # trimmed: t1=[1,-2,3,0,0]  t2=[-4,1,2,0,0]  t3=[2,-1,0,0.3,3]  (t3: |3|,|2|,|-1| -> keep 3, 2, -1)
    got = merge_deltas([t1, t2, t3], "ties", density=0.6)
    # elem0: sum=-1 -> sign -, agreeing {-4} -> -4 ; elem1: sum=-2 -> -, {-2,-1} -> -1.5
    # elem2: sum=5 -> +, {3,2} -> 2.5 ; elem3: all zero -> 0 ; elem4: {3} -> 3
    assert torch.allclose(got, torch.tensor([-4.0, -1.5, 2.5, 0.0, 3.0]))
    assert torch.allclose(ties_combine([torch.tensor([1.0, -1.0])]), torch.tensor([1.0, -1.0]))


def test_dare_deterministic_and_unbiased():
    d = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    a = merge_deltas([d], "dare", p=0.7, seed=5, key="k")
    b = merge_deltas([d], "dare", p=0.7, seed=5, key="k")
    assert torch.equal(a, b)
    assert not torch.equal(a, merge_deltas([d], "dare", p=0.7, seed=6, key="k"))
    kept = (a != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.02
    mean = torch.stack([merge_deltas([d], "dare", p=0.5, seed=s, key="k") for s in range(200)]).mean(0)
    assert float((mean - d).norm() / d.norm()) < 0.1


def _lm(name, r=2, out=6, inn=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoraModule(name=name, file=name + ".safetensors", alpha=float(r), down=torch.randn(r, inn, generator=g),
                      up=torch.randn(out, r, generator=g))


def test_merged_deltas_accel_linear_and_order_independent():
    shapes = {"w1": (6, 5), "w2": (6, 5)}
    acc = [(_lm("a1", seed=1), 1.0), (_lm("a2", seed=2), 1.0)]
    s1 = [(_lm("a1", seed=3), 0.8)]
    s2 = [(_lm("a1", seed=4), 0.5), (_lm("a2", seed=5), 0.5)]
    m2h = {"a1": "w1", "a2": "w2"}
    def merged(accel, styles, mode):  # what FewStep LoRA Fuse computes: plan the keys, then each key's delta
        plan = plan_merge(accel, styles, shapes, m2h, mode=mode)
        return {k: merged_key_delta(k, shape, a, present, mode=mode, seed=3, density=0.5)
                for k, (shape, a, present) in plan.items()}

    for mode in ("linear", "ties", "dare", "dare_ties"):
        out = merged(acc, [s1, s2], mode)
        acc_only = key_delta([acc[0]], "w1", (6, 5))
        styles = [key_delta(s1, "w1", (6, 5)), key_delta([s2[0]], "w1", (6, 5))]
        exp = acc_only + (styles[0] + styles[1] if mode == "linear" else
                          merge_deltas(styles, mode, density=0.5, seed=3, key="w1", p=0.5))
        assert torch.allclose(out["w1"], exp, atol=1e-6), mode
        # key processing order does not change DARE masks
        rev = merged(list(reversed(acc)), [list(reversed(s1)), list(reversed(s2))], mode)
        assert torch.allclose(rev["w2"], out["w2"], atol=1e-6)


def _lowrank(m, n, svals, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(svals), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(svals), generator=g))
    return (u * torch.tensor(svals)) @ v.T


def test_export_vs_full_svd_and_conv_shapes(tmp_path):
    g = torch.Generator().manual_seed(0)
    svals = [10.0 * 0.8 ** i for i in range(60)]
    lin = _lowrank(120, 96, svals) + 1e-3 * torch.randn(120, 96, generator=g)
    conv = _lowrank(32, 16 * 9, svals[:24], seed=1).reshape(32, 16, 3, 3)
    deltas = {"diffusion_model.input_blocks.1.1.proj_in.weight": lin,
              "diffusion_model.input_blocks.1.0.in_layers.2.weight": conv,
              "diffusion_model.input_blocks.1.0.in_layers.2.bias": torch.randn(32, generator=g)}
    sd, rep = export_lora(deltas, rank=16, seed=1, dtype=torch.float32)
    sdf, repf = full_svd_export(deltas, rank=16, dtype=torch.float32)
    for kr, kf in zip(rep.keys, repf.keys):
        assert kr.rel_error <= kf.rel_error * (1 + 1e-3) + 1e-7, (kr, kf)
    assert abs(rep.overall_rel_error - repf.overall_rel_error) <= 1e-3 * repf.overall_rel_error
    n = "lora_unet_input_blocks_1_0_in_layers_2"
    assert sd[n + ".lora_down.weight"].shape == (16, 16, 3, 3)
    assert sd[n + ".lora_up.weight"].shape == (32, 16, 1, 1)
    assert float(sd[n + ".alpha"]) == 16.0
    assert torch.equal(sd[n + ".diff_b"], deltas["diffusion_model.input_blocks.1.0.in_layers.2.bias"])
    # round trip through our reader: alpha/rank = 1
    p = str(tmp_path / "exp.safetensors")
    save_lora(p, sd, rep)
    ad = read_adapter(p)
    e = next(x for x in ad.entries if x.name == n and x.kind == "lora")
    assert e.scale == 1.0
    rebuilt = key_delta([(e, 1.0)], "k", (32, 16, 3, 3))
    exp = (sd[n + ".lora_up.weight"].flatten(1) @ sd[n + ".lora_down.weight"].flatten(1)).reshape(32, 16, 3, 3)
    assert torch.allclose(rebuilt, exp, atol=1e-5)


def test_energy_threshold_rank():
    svals = [4.0, 3.0, 2.0, 1.0]  # energies 16, 9, 4, 1 of 30
    m = _lowrank(40, 30, svals)
    # cumulative fro fractions: sqrt(16/30)=.730, sqrt(25/30)=.913, sqrt(29/30)=.983, 1
    for e, r in [(0.7, 1), (0.9, 2), (0.95, 3), (0.99, 4)]:
        _, rep = export_lora({"diffusion_model.out.2.weight": m}, energy=e, max_rank=20, dtype=torch.float32)
        assert rep.keys[0].rank == r, (e, rep.keys[0])


def _accel_file(path, ctx=768, te=False, rank=8, meta=None):
    sd = {}
    g = torch.Generator().manual_seed(0)
    for blk in ["down_blocks_0_resnets_0", "down_blocks_0_resnets_1", "down_blocks_1_resnets_0",
                "down_blocks_1_resnets_1", "down_blocks_2_resnets_0", "down_blocks_3_resnets_0", "mid_block_resnets_0",
                "up_blocks_0_resnets_0", "up_blocks_1_resnets_0", "up_blocks_2_resnets_0"]:
        for layer, inn in [("conv1", 8 * 9), ("conv2", 8 * 9), ("time_emb_proj", 16)]:
            n = f"lora_unet_{blk}_{layer}"
            shape = (rank, 8, 3, 3) if "conv" in layer else (rank, 16)
            sd[n + ".lora_down.weight"] = torch.randn(*shape, generator=g)
            sd[n + ".lora_up.weight"] = torch.randn(8, rank, *([1, 1] if "conv" in layer else []), generator=g)
            sd[n + ".alpha"] = torch.tensor(float(rank))
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd[n + ".lora_down.weight"] = torch.randn(rank, ctx, generator=g)
    sd[n + ".lora_up.weight"] = torch.randn(8, rank, generator=g)
    if te:
        sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(rank, 8, generator=g)
        sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, rank, generator=g)
    return save(path, sd, meta)


@pytest.mark.parametrize("name,kind,preset,steps", [
    ("lcm-lora-sdv1-5.safetensors", "lcm", "LCM-LoRA", None),
    ("TCD-SD15-LoRA.safetensors", "tcd", "TCD", None),
    ("Hyper-SD15-4steps-lora.safetensors", "hypersd", "Hyper-SD 4-step", 4),
    ("Hyper-SD15-1step-lora.safetensors", "hypersd", "Hyper-SD 1-step unified", 1),
    ("Hyper-SD15-12steps-CFG-lora.safetensors", "hypersd", "Hyper-SD CFG 12-step", 12),
    ("pcm_sd15_smallcfg_2step_converted.safetensors", "pcm", "PCM smallcfg 2-step", 2),
    ("pcm_sd15_normalcfg_16step_converted.safetensors", "pcm", "PCM normalcfg 16-step", 16),
    ("pcm_sd15_lcmlike_lora_converted.safetensors", "pcm", "PCM LCM-like", None),
    ("AnimateLCM_sd15_t2v_lora.safetensors", "animatelcm", "AnimateLCM", None),
])
def test_detect_names(tmp_path, name, kind, preset, steps):
    d = detect(_accel_file(str(tmp_path / name)))
    assert (d.kind, d.preset_name, d.steps, d.base_model) == (kind, preset, steps, "sd15")
    assert d.confidence == "high" and d.evidence


def test_detect_lightning_sdxl_and_conflict(tmp_path):
    d = detect(_accel_file(str(tmp_path / "sdxl_lightning_4step_lora.safetensors"), ctx=2048))
    assert (d.kind, d.preset_name, d.steps, d.base_model, d.confidence) == \
        ("lightning", "SDXL-Lightning 4-step", 4, "sdxl", "high")
    d = detect(_accel_file(str(tmp_path / "sdxl_lightning_8step_lora.safetensors"), ctx=768))
    assert d.base_model == "sd15" and d.confidence == "low" and any("CONFLICT" in e for e in d.evidence)
    assert match_name("pcm_sdxl_smallcfg_3step.safetensors")[1] is None  # no preset for 3 steps


def test_detect_folder_metadata_structure(tmp_path):
    p = _accel_file(str(tmp_path / "lcm-lora-sdxl" / "pytorch_lora_weights.safetensors"), ctx=2048)
    d = detect(p)
    assert d.kind == "lcm" and d.base_model == "sdxl"
    d = detect(_accel_file(str(tmp_path / "x.safetensors"), meta={"modelspec.title": "TCD-SDXL-LoRA"}, ctx=2048))
    assert d.kind == "tcd"
    d = detect(_accel_file(str(tmp_path / "mystery.safetensors")))
    assert d.kind == "unknown" and d.preset_name is None and d.confidence == "low" and d.accel_like_structure
    assert any("structure alone" in e for e in d.evidence)
    d = detect(_accel_file(str(tmp_path / "style.safetensors"), te=True, meta={"ss_network_alpha": "8"}))
    assert d.kind == "unknown" and not d.accel_like_structure
    assert any("text encoder" in e for e in d.evidence)
    # A header hash claim counts only when the payload agrees (tests/math/test_lora_detect_structure.py).
    d = detect(_accel_file(str(tmp_path / "h.safetensors"), meta={"sshs_model_hash": "e476eb1da5df" + "0" * 52}))
    assert d.kind == "unknown" and any("the claim is ignored" in e for e in d.evidence), d.evidence
    d = detect(_accel_file(str(tmp_path / "sd2.safetensors"), ctx=1024))
    assert d.base_model == "sd2"
    assert json.dumps(d.evidence)


def test_ties_details_follow_peft():
    """TIES keeps int(density*n) entries per key and a zero sum elects +1 (PEFT / mergekit); dare_ties is DARE then
    TIES election without a magnitude trim, so density does not change it."""
    from fewstep.lora.merge import trim_top_k, ties_combine
    t = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0])
    assert torch.equal(trim_top_k(t, 0.5), torch.tensor([5.0, -4.0, 0.0, 0.0, 0.0]))  # int(2.5) = 2
    assert torch.equal(trim_top_k(t, 0.01), torch.tensor([5.0, 0, 0, 0, 0]))  # at least one
    a, b = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([-1.0, 2.0, 1.0])
    assert torch.equal(ties_combine([a, b]), torch.tensor([1.0, 2.0, -3.0]))  # 1-1 = 0 elects +1
    d = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    x = merge_deltas(d, "dare_ties", density=0.05, p=0.3, seed=1, key="k")
    y = merge_deltas(d, "dare_ties", density=0.9, p=0.3, seed=1, key="k")
    assert torch.equal(x, y)


def test_lokr_tucker_conv_entry():
    """LyCORIS writes LoKr 3x3 convs with a Tucker core (lokr_t2) by default: the rebuilt w2 is a permuted view, which
    torch.kron refused; the delta equals LyCORIS' make_kron (kron of w1 with the contiguous Tucker rebuild)."""
    from fewstep.lora.adapters import LokrModule
    from fewstep.lora.fuse import check_key_shapes
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w1 = r(4, 4)
    t2, w2_a, w2_b = r(2, 2, 3, 3), r(2, 80), r(2, 160)  # LyCORIS: w2_a [r, out/4], w2_b [r, in/4]; 320 x 640
    e = LokrModule(name="m", file="f.safetensors", alpha=2.0, w1=w1, w2_a=w2_a, w2_b=w2_b, t2=t2)
    shape = (320, 640, 3, 3)
    check_key_shapes([(e, 1.0)], "k.weight", shape)
    got = key_delta([(e, 1.0)], "k.weight", shape)
    w2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a).contiguous()
    want = torch.kron(w1[:, :, None, None], w2) * (2.0 / 2)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    bad = LokrModule(name="m", file="f.safetensors", alpha=2.0, w1=w1, w2_a=w2_a, w2_b=r(3, 160), t2=t2)
    with pytest.raises(ValueError, match=r"f\.safetensors: lokr module 'm' has factor shapes that cannot make "
                                         r"'k\.weight' \[320, 640, 3, 3\]"):
        check_key_shapes([(bad, 1.0)], "k.weight", shape)


def _style_file(path, names, ctx=768, te=True, rank=8):
    """A kohya style LoRA: attention only (q/k/v/out of a few blocks), with text-encoder keys."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for blk in names:
        for proj, inn in (("attn1_to_q", 320), ("attn2_to_k", ctx), ("attn2_to_v", ctx), ("attn1_to_out_0", 320)):
            n = f"lora_unet_{blk}_transformer_blocks_0_{proj}"
            sd[n + ".lora_down.weight"] = torch.randn(rank, inn, generator=g)
            sd[n + ".lora_up.weight"] = torch.randn(320, rank, generator=g)
    if te:
        sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(rank, 768, generator=g)
        sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(3072, rank, generator=g)
    return save(path, sd, {"ss_network_dim": str(rank)})


@pytest.mark.parametrize("name", ["anime_lcm_lora.safetensors", "pixelart_sdxl_lightning_4step_lora.safetensors",
                                  "my_style_tcd.safetensors"])
def test_style_structure_vetoes_a_release_like_name(tmp_path, name):
    """A style LoRA (text-encoder keys, attention only) named after an acceleration LoRA is reported unknown, with
    the name noted, instead of getting a preset."""
    d = detect(_style_file(str(tmp_path / name), ["down_blocks_0_attentions_0", "up_blocks_3_attentions_2"]))
    assert d.kind == "unknown" and d.preset_name is None and d.confidence == "low", d
    assert any("not treated as an acceleration LoRA" in e for e in d.evidence)


@pytest.mark.parametrize("parts,kind,preset,base", [
    (("SD1.5", "lcm"), "lcm", "LCM-LoRA", "sd15"),  # ComfyUI-Manager's save path for "LCM LoRA SD1.5"
    (("hub", "models--latent-consistency--lcm-lora-sdv1-5", "snapshots", "d2a6220"), "lcm", "LCM-LoRA", "sd15"),
    (("SD1.5", "tcd"), "tcd", "TCD", "sd15"),
])
def test_generic_name_looks_up_parent_folders(tmp_path, parts, kind, preset, base):
    d = detect(_accel_file(str(tmp_path.joinpath(*parts) / "pytorch_lora_weights.safetensors")))
    assert (d.kind, d.preset_name, d.base_model) == (kind, preset, base), d.evidence


@pytest.mark.parametrize("name,preset,ctx", [
    ("sdxl_hyper_sd_4step_lora.safetensors", "Hyper-SD 4-step", 2048),  # Fooocus
    ("hypersd-xl-8steps.safetensors", "Hyper-SD 8-step", 2048),
    ("sdxl_hyper_sd_8step_cfg_lora.safetensors", "Hyper-SD CFG 8-step", 2048),
    ("SDXL-Lightning-4step.safetensors", "SDXL-Lightning 4-step", 2048),
    ("sd15_lora_beta.safetensors", "AnimateLCM", 768),  # AnimateLCM's original name (diffusers docs)
])
def test_names_seen_in_the_wild_need_the_structure(tmp_path, name, preset, ctx):
    d = detect(_accel_file(str(tmp_path / "a" / name), ctx=ctx))
    assert d.preset_name == preset and d.confidence == "high", d.evidence
    s = detect(_style_file(str(tmp_path / "b" / name), ["down_blocks_1_attentions_0"], ctx=ctx, te=False))
    assert s.kind == "unknown", s.evidence  # the loose spelling alone is not enough


def test_base_sd2_ssd1b_and_hash_fallback(tmp_path, monkeypatch):
    """SD1.x vs SD2.x without cross-attention k/v: proj_in's layer type; SSD-1B (no mid-block attention, 4 deep
    transformer blocks) is not SDXL; an unnamed acceleration-shaped file is looked up by its payload hash."""
    import fewstep.lora.detect as D
    g = torch.Generator().manual_seed(2)

    def lora(sd, name, down_shape, out=8):
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(*down_shape, generator=g)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, down_shape[0], *([1, 1] if len(down_shape) == 4
                                                                                     else []), generator=g)
    for conv, want in ((True, "sd15"), (False, "sd2")):
        sd = {}
        lora(sd, "down_blocks_3_resnets_0_conv1", (4, 8, 3, 3))
        lora(sd, "down_blocks_1_attentions_0_proj_in", (4, 640, 1, 1) if conv else (4, 640))
        d = detect(save(str(tmp_path / f"{want}.safetensors"), sd))
        assert d.base_model == want, d.evidence
    sd = {}
    lora(sd, "down_blocks_3_resnets_0_conv1", (4, 8, 3, 3))
    assert detect(save(str(tmp_path / "ambiguous.safetensors"), sd)).base_model is None  # SD1.x or SD2.x
    ssd, xl = {}, {}
    for tgt, depth, mid in ((ssd, 4, False), (xl, 10, True)):
        for i in range(depth):
            lora(tgt, f"down_blocks_2_attentions_0_transformer_blocks_{i}_attn2_to_k", (4, 2048))
        lora(tgt, "up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (4, 1280))
        if mid:
            lora(tgt, "mid_block_attentions_0_transformer_blocks_0_attn1_to_q", (4, 1280))
    assert detect(save(str(tmp_path / "ssd.safetensors"), ssd)).base_model == "ssd1b"
    assert detect(save(str(tmp_path / "xl.safetensors"), xl)).base_model == "sdxl"
    p = _accel_file(str(tmp_path / "renamed.safetensors"))
    d = detect(p)
    assert d.kind == "unknown" and any("payload hash" in e for e in d.evidence)
    monkeypatch.setitem(D.KNOWN_HASHES, D.addnet_hash(p)[:12], ("hypersd", "Hyper-SD 8-step", "sd15"))
    d = detect(p)
    assert (d.kind, d.preset_name, d.confidence) == ("hypersd", "Hyper-SD 8-step", "high")


def test_dare_mask_follows_the_style_position_not_the_keys_style_count():
    """A key only the second style touches draws that style's DARE mask (index 1), so adding or removing the first
    style elsewhere never changes it; merge_deltas with the styles' indices is the one DARE combine the node runs."""
    from fewstep.lora.merge import dare_drop
    shapes = {"w1": (6, 5), "w2": (6, 5)}
    s1 = [(_lm("a1", seed=3), 0.8)]
    s2 = [(_lm("a2", seed=5), 0.5)]
    plan = plan_merge([], [s1, s2], shapes, {"a1": "w1", "a2": "w2"}, mode="dare")
    shape, acc, present = plan["w2"]
    assert [i for i, _ in present] == [1]
    got = merged_key_delta("w2", shape, acc, present, mode="dare", p=0.5, seed=7)
    alone = key_delta(s2, "w2", (6, 5))
    assert torch.equal(got, dare_drop(alone, 0.5, 7, "w2", 1))
    assert torch.equal(got, merge_deltas([alone], "dare", p=0.5, seed=7, key="w2", indices=[1]))
    assert not torch.equal(got, merge_deltas([alone], "dare", p=0.5, seed=7, key="w2"))  # index 0: another mask


def test_family_records():
    """Each family is one record (key layout + block layout); SD2 and SSD-1B share SD1.5's and SDXL's block layouts,
    Wan 2.1 and Wan 2.2 5B theirs; every family the host loads has one; an unknown family is named in the error; a
    Stack-style syntax check accepts a preset or numbers of any length (the fuse checks the length against the
    model's layout)."""
    from fewstep.lora.families import family
    from fewstep.lora.merge import check_block_weights
    assert family("sd2").blocks is family("sd15").blocks and family("ssd1b").blocks is family("sdxl").blocks
    assert family("wan22_5b").keys is family("wan").keys
    assert set(FAMILIES) == {"sd15", "sd2", "sdxl", "ssd1b", "sd3", "flux", "wan", "wan22_5b", "qwen_image",
                             "hunyuan_video"}
    with pytest.raises(ValueError, match=r"family \('unknown'\) is not one LoRA fusing knows"):
        family("unknown")
    check_block_weights(",".join(["1"] * 12))
    check_block_weights("1,1,1")
    check_block_weights("all")
    with pytest.raises(ValueError, match="not a number"):
        check_block_weights("1,x")
