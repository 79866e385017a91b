"""lora.formats + lora.keys: every key style gives the same deltas; bad inputs name file and key."""
from __future__ import annotations
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _unet_keys import STYLES, ldm_to_diffusers, node_deltas, save, tiny_sd15, write_lora  # noqa: E402

from fewstep.lora.adapters import LoraModule  # noqa: E402
from fewstep.lora.formats import read_adapter  # noqa: E402
from fewstep.lora.keys import KeyMapper, canonical, require_all_matched  # noqa: E402

U = tiny_sd15()
TARGETS = [
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight",
    "diffusion_model.output_blocks.5.1.proj_in.weight",
    "diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight",
]


def make_factors(seed=0, rank=4, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for hk in TARGETS:
        shape = U.shapes[hk]
        down = torch.randn(rank, *shape[1:], generator=g)
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g)
        out[hk] = (down, up, alpha)
    return out


def deltas_for(path):
    ad = read_adapter(path)
    km = KeyMapper(U.key_map, U.diffusers_to_ldm)
    matched, unmatched = km.match(ad.modules())
    assert unmatched == []
    return node_deltas([(e, 0.7) for e in ad.entries], U.shapes, matched)


def test_all_key_styles_identical(tmp_path):
    f = make_factors()
    ref = None
    for style in STYLES:
        p = write_lora(str(tmp_path / f"{style}.safetensors"), f, U, style)
        d = deltas_for(p)
        assert set(d) == set(TARGETS), style
        if ref is None:
            ref = d
        for k in TARGETS:
            assert torch.equal(d[k], ref[k]), (style, k)
    # independent reference
    for hk, (down, up, alpha) in f.items():
        exp = 0.7 * alpha / down.shape[0] * (up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double())
        got = ref[hk].reshape(exp.shape).double()
        assert torch.allclose(got, exp, rtol=1e-5, atol=1e-5)


def test_comfy_drops_peft_attention_but_we_map_it():
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert name not in U.key_map  # ComfyUI only knows the .processor. spelling
    km = KeyMapper(U.key_map, U.diffusers_to_ldm)
    assert km.lookup(name) == "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert km.lookup("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out") == \
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight"
    assert canonical("lora_unet_input_blocks_4_1_proj_in") == "input_blocks_4_1_proj_in"


def test_alpha_tensor_vs_metadata(tmp_path):
    f = make_factors(alpha=3.0)
    a = write_lora(str(tmp_path / "a.safetensors"), f, U, "kohya_ldm", alpha_in_tensor=True)
    b = write_lora(str(tmp_path / "b.safetensors"), f, U, "kohya_ldm", alpha_in_tensor=False,
                   metadata={"ss_network_alpha": "3.0", "ss_network_dim": "4"})
    c = write_lora(str(tmp_path / "c.safetensors"), f, U, "peft", alpha_in_tensor=False,
                   metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 3.0})})
    d = write_lora(str(tmp_path / "d.safetensors"), f, U, "peft", alpha_in_tensor=False)
    da, db, dc, dd = (deltas_for(p) for p in (a, b, c, d))
    srcs = {e.alpha_source for e in read_adapter(b).entries}
    assert srcs == {"ss_network_alpha"}
    assert {e.alpha_source for e in read_adapter(c).entries} == {"lora_adapter_metadata"}
    assert {e.alpha_source for e in read_adapter(d).entries} == {"rank"}
    for k in TARGETS:
        assert torch.equal(da[k], db[k]) and torch.equal(da[k], dc[k])
        assert torch.allclose(dd[k] * 0.75, da[k], rtol=1e-5, atol=1e-6)  # alpha=rank -> scale 1 vs 3/4


def test_alpha_pattern(tmp_path):
    f = make_factors(alpha=4.0)
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": 4, "alpha_pattern": {"attn1.to_q": 8}})}
    p = write_lora(str(tmp_path / "p.safetensors"), f, U, "peft", alpha_in_tensor=False, metadata=meta)
    ad = read_adapter(p)
    got = {e.name.split(".")[-1]: e.alpha for e in ad.entries}
    assert got["to_q"] == 8 and got["to_k"] == 4


def test_text_encoder_and_unknown_keys_reported(tmp_path):
    f = make_factors()
    extra = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
             "text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8),
             "lora_unet_foo.oft_diag": torch.zeros(3)}
    p = write_lora(str(tmp_path / "te.safetensors"), f, U, "kohya_ldm", extra=extra)
    ad = read_adapter(p)
    assert len(ad.text_encoder_keys) == 3
    assert ad.unknown_keys == ["lora_unet_foo.oft_diag"]
    assert "text encoder keys (not fused into the UNet)" in ad.summary()
    with pytest.raises(ValueError, match="lora_unet_foo.oft_diag"):
        read_adapter(p, strict=True)


def test_bad_inputs(tmp_path):
    for ext in (".ckpt", ".pt", ".bin"):
        p = tmp_path / f"x{ext}"
        p.write_bytes(b"\x80\x04junk")
        with pytest.raises(ValueError, match=r"x\%s.*convert.*safetensors" % ext):
            read_adapter(str(p))
    f = make_factors()
    good = write_lora(str(tmp_path / "good.safetensors"), f, U, "kohya_ldm")
    raw = open(good, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        read_adapter(str(trunc))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        read_adapter(str(garbage))
    nan = save(str(tmp_path / "nan.safetensors"), {"lora_unet_x.lora_down.weight": torch.tensor([[float("nan")]]),
                                                   "lora_unet_x.lora_up.weight": torch.ones(1, 1)})
    with pytest.raises(ValueError, match=r"nan.safetensors.*lora_unet_x.lora_down.weight"):
        read_adapter(nan)
    half = save(str(tmp_path / "half.safetensors"), {"lora_unet_x.lora_up.weight": torch.ones(2, 1)})
    with pytest.raises(ValueError, match=r"half.safetensors.*lora_unet_x.lora_up.weight"):
        read_adapter(half)


def test_unmatched_keys_raise(tmp_path):
    p = save(str(tmp_path / "xl.safetensors"), {
        "lora_unet_output_blocks_2_1_transformer_blocks_6_attn1_to_q.lora_down.weight": torch.ones(2, 8),
        "lora_unet_output_blocks_2_1_transformer_blocks_6_attn1_to_q.lora_up.weight": torch.ones(8, 2)})
    ad = read_adapter(p)
    matched, unmatched = KeyMapper(U.key_map, U.diffusers_to_ldm).match(ad.modules())
    assert matched == {} and unmatched == ["lora_unet_output_blocks_2_1_transformer_blocks_6_attn1_to_q"]
    with pytest.raises(ValueError, match=r"xl.safetensors.*output_blocks_2_1_transformer_blocks_6"):
        require_all_matched(ad.path, unmatched)
    with pytest.raises(ValueError, match=r"xl.safetensors.*matches no model weight"):
        node_deltas([(e, 1.0) for e in ad.entries], U.shapes, matched)


def test_shape_mismatch_names_file_key_shapes(tmp_path):
    hk = TARGETS[0]
    p = save(str(tmp_path / "wrong.safetensors"), {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, 5),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(8, 2)})
    ad = read_adapter(p)
    matched, _ = KeyMapper(U.key_map).match(ad.modules())
    with pytest.raises(ValueError, match=r"wrong.safetensors.*attn1_to_q.*\(8, 5\).*" + hk.replace(".", r"\.") +
                       r".*\(8, 8\)"):
        node_deltas([(e, 1.0) for e in ad.entries], U.shapes, matched)


def test_entry_types_parsed(tmp_path):
    m = "lora_unet_input_blocks_1_0_in_layers_2"
    p = save(str(tmp_path / "mixed.safetensors"), {
        m + ".lora_down.weight": torch.ones(2, 8, 1, 1), m + ".lora_mid.weight": torch.ones(2, 2, 3, 3),
        m + ".lora_up.weight": torch.ones(8, 2, 1, 1), m + ".alpha": torch.tensor(1.0),
        "lora_unet_out_2.diff": torch.ones(4, 8, 3, 3), "lora_unet_out_2.diff_b": torch.ones(4),
        "lora_unet_time_embed_0.hada_w1_a": torch.ones(16, 2), "lora_unet_time_embed_0.hada_w1_b": torch.ones(2, 8),
        "lora_unet_time_embed_0.hada_w2_a": torch.ones(16, 2), "lora_unet_time_embed_0.hada_w2_b": torch.ones(2, 8),
        "lora_unet_time_embed_2.lokr_w1": torch.ones(4, 4), "lora_unet_time_embed_2.lokr_w2_a": torch.ones(4, 2),
        "lora_unet_time_embed_2.lokr_w2_b": torch.ones(2, 4)})
    ad = read_adapter(p)
    kinds = sorted(e.kind for e in ad.entries)
    assert kinds == ["bias_diff", "diff", "loha", "lokr", "lora"]
    locon = next(e for e in ad.entries if isinstance(e, LoraModule))
    assert locon.mid is not None and locon.scale == 0.5


def test_nonfinite_detected_in_every_float_dtype(tmp_path):
    """One NaN, +Inf or -Inf anywhere in a factor of any float dtype is an error naming the file and tensor."""
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.randn(16, 77).to(dt)
            t[11, 53] = bad
            name = f"bad-{str(dt)[6:]}-{bad}.safetensors"
            p = save(str(tmp_path / name), {"lora_unet_x.lora_down.weight": torch.ones(16, 3).to(dt),
                                            "lora_unet_x.lora_up.weight": t})
            with pytest.raises(ValueError, match=rf"{name}.*lora_unet_x.lora_up.weight.*NaN or Inf"):
                read_adapter(p)
        ok = save(str(tmp_path / f"ok-{str(dt)[6:]}.safetensors"),
                  {"lora_unet_x.lora_down.weight": torch.full((4, 3), 6e4).to(dt),
                   "lora_unet_x.lora_up.weight": torch.full((5, 4), -6e4).to(dt)})
        assert len(read_adapter(ok).entries) == 1  # large finite values (their sum would overflow fp16) pass


# ---------------------------------------------------------------- PEFT / diffusers DoRA (lora_magnitude_vector)

PEFT_DORA_NAMINGS = [  # (down, up, magnitude) suffixes PEFT / diffusers / ComfyUI-trainer exports write
    (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"),
    (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight", ".lora_magnitude_vector.default.weight"),
]


def peft_dora_file(path, naming, seed=0, metadata=None, magnitude_fn=None):
    """A PEFT DoRA file on TARGETS: {unet.<diffusers module><suffix>}; returns (path, {host key: (down, up, m)})."""
    down_s, up_s, mag_s = naming
    l2d = ldm_to_diffusers(U)
    g = torch.Generator().manual_seed(seed + 100)
    sd, truth = {}, {}
    for hk, (down, up, _) in make_factors(seed=seed).items():
        shape = U.shapes[hk]
        n = torch.rand(shape[0], generator=g) + 0.5
        m = n.view(1, -1, 1, 1) if len(shape) == 4 else n  # PEFT: [out] for Linear, [1, out, 1, 1] for Conv2d
        if magnitude_fn is not None:
            m = magnitude_fn(m)
        mod = "unet." + l2d[hk]
        sd.update({mod + down_s: down, mod + up_s: up, mod + mag_s: m})
        truth[hk] = (down, up, m)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True})} \
        if metadata is None else metadata
    return save(str(path), sd, metadata=meta), truth


def base_weights(seed=7):
    g = torch.Generator().manual_seed(seed)
    return {hk: torch.randn(*U.shapes[hk], generator=g) for hk in TARGETS}


def peft_dora_deltas(path, strength=0.7):
    ad = read_adapter(path)
    matched, unmatched = KeyMapper(U.key_map, U.diffusers_to_ldm).match(ad.modules())
    assert unmatched == []
    W = base_weights()
    return ad, matched, node_deltas([(e, strength) for e in ad.entries], U.shapes, matched,
                                       base_weight_fn=W.__getitem__)


def test_peft_dora_file_round_trip(tmp_path):
    W = base_weights()
    ref = None
    for i, naming in enumerate(PEFT_DORA_NAMINGS):
        p, truth = peft_dora_file(tmp_path / f"dora{i}.safetensors", naming)
        ad, matched, d = peft_dora_deltas(p)
        assert ad.unknown_keys == [] and len(ad.entries) == len(TARGETS)
        assert sorted(t.key for t in matched.values()) == sorted(TARGETS)
        assert all(t.whole for t in matched.values())
        for e in ad.entries:
            down, up, m = truth[matched[e.name].key]
            assert isinstance(e, LoraModule) and e.kind == "lora"
            assert e.dora_norm == "peft" and torch.equal(e.dora_scale, m)
            assert e.name + naming[2] in e.source_keys
            assert torch.equal(e.up, up) and torch.equal(e.down, down)
            assert (e.alpha, e.alpha_source, e.scale) == (8.0, "lora_adapter_metadata", 2.0)
        for hk, (down, up, m) in truth.items():
            # independent PEFT merge: W' = m / ‖W + 2·BA‖_row · (W + 2·BA); delta = 0.7·(W' − W)
            w = W[hk].double()
            wc = w + 2.0 * (up.flatten(1).double() @ down.flatten(1).double()).reshape(w.shape)
            norm = torch.linalg.vector_norm(wc, dim=tuple(range(1, w.dim())))
            exp = 0.7 * ((m.double().flatten() / (norm + torch.finfo(torch.float32).eps))
                         .view(-1, *[1] * (w.dim() - 1)) * wc - w)
            assert torch.allclose(d[hk].double(), exp, rtol=1e-5, atol=1e-5), (naming, hk)
        if ref is None:
            ref = d
        for hk in TARGETS:
            assert torch.equal(d[hk], ref[hk]), (naming, hk)  # every naming gives the same deltas


def test_peft_dora_errors(tmp_path):
    m = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lone = save(str(tmp_path / "lone.safetensors"), {m + ".lora_magnitude_vector": torch.ones(8)})
    with pytest.raises(ValueError, match=rf"lone.safetensors: '{m}\.lora_magnitude_vector' .*no LoRA up/down"):
        read_adapter(lone)
    loha = save(str(tmp_path / "loha.safetensors"), {
        m + ".hada_w1_a": torch.ones(8, 2), m + ".hada_w1_b": torch.ones(2, 8), m + ".hada_w2_a": torch.ones(8, 2),
        m + ".hada_w2_b": torch.ones(2, 8), m + ".lora_magnitude_vector.weight": torch.ones(8)})
    with pytest.raises(ValueError, match=rf"loha.safetensors: '{m}\.lora_magnitude_vector\.weight' .*no LoRA"):
        read_adapter(loha)
    factors = {m + ".lora_A.weight": torch.ones(2, 8), m + ".lora_B.weight": torch.ones(8, 2)}
    both = save(str(tmp_path / "both.safetensors"), {**factors, m + ".lora_magnitude_vector": torch.ones(8),
                                                     m + ".dora_scale": torch.ones(8, 1)})
    with pytest.raises(ValueError, match=rf"both.safetensors: module '{m}' has two DoRA magnitudes.*dora_scale.*"
                                         rf"lora_magnitude_vector"):
        read_adapter(both)
    twice = save(str(tmp_path / "twice.safetensors"), {**factors, m + ".lora_magnitude_vector": torch.ones(8),
                                                       m + ".lora_magnitude_vector.weight": torch.ones(8)})
    with pytest.raises(ValueError, match=r"twice.safetensors.*two tensors for 'magnitude'"):
        read_adapter(twice)
    nan = save(str(tmp_path / "nan.safetensors"), {**factors, m + ".lora_magnitude_vector":
                                                   torch.tensor([1.0] * 7 + [float("nan")])})
    with pytest.raises(ValueError, match=rf"nan.safetensors: tensor '{m}\.lora_magnitude_vector' contains NaN"):
        read_adapter(nan)
    # wrong length: the file reads (the reader does not know the model), the fuse names file, key and shapes
    p, _ = peft_dora_file(tmp_path / "short.safetensors", PEFT_DORA_NAMINGS[0], magnitude_fn=lambda t: t.flatten()[:-1])
    assert all(e.dora_norm == "peft" for e in read_adapter(p).entries)
    with pytest.raises(ValueError, match=r"short.safetensors: 'unet\.[\w.]+\.lora_magnitude_vector' \(PEFT DoRA "
                                         r"magnitude\) has shape \(\d+,\) but model weight 'diffusion_model\."):
        peft_dora_deltas(p)


# ---------------------------------------------------------------- trainer formats found by the format audit

def test_onetrainer_omi_text_encoder_and_embedding_keys(tmp_path):
    """OneTrainer's OMI format names the encoders clip_l./clip_g. and bundles embeddings under bundle_emb.: they
    are text-encoder keys and embeddings, not UNet modules that match nothing; te_state_dict renames the encoder
    keys to spellings core ComfyUI's CLIP key map knows, keeping their alpha tensors."""
    from fewstep.lora.formats import te_state_dict
    f = make_factors()
    te = "clip_l.text_model.encoder.layers.0.self_attn.q_proj"
    te_g = "clip_g.text_model.encoder.layers.3.mlp.fc1"
    extra = {f"{te}.lora_down.weight": torch.ones(4, 768), f"{te}.lora_up.weight": torch.ones(768, 4),
             f"{te}.alpha": torch.tensor(2.0), f"{te_g}.lora_down.weight": torch.ones(4, 1280),
             f"{te_g}.lora_up.weight": torch.ones(5120, 4), "bundle_emb.mystyle.clip_l": torch.zeros(2, 768)}
    p = write_lora(str(tmp_path / "omi.safetensors"), f, U, "kohya_ldm", extra=extra)
    ad = read_adapter(p, strict=True)
    assert sorted(ad.text_encoder_keys) == sorted(k for k in extra if not k.startswith("bundle_emb."))
    assert ad.embedding_keys == ["bundle_emb.mystyle.clip_l"] and ad.unknown_keys == []
    assert "1 bundled embedding tensors" in ad.summary()
    host = te_state_dict({k: v for k, v in extra.items() if k in ad.text_encoder_keys}, ad.metadata, p)
    assert sorted(host) == sorted([
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.lora_down.weight",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.lora_up.weight"])
    assert host["text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha"].item() == 2.0


@pytest.mark.parametrize("width, prefix", [(768, "text_encoder."), (1280, "text_encoder_2.")])
def test_peft_clip_adapter_is_a_text_encoder_adapter(tmp_path, width, prefix):
    """A PEFT adapter saved from a CLIPTextModel (base_model.model.text_model.*) is a text-encoder adapter; it goes
    to the encoder its attention width names (1280: SDXL's CLIP-G)."""
    from fewstep.lora.formats import te_state_dict
    m = "base_model.model.text_model.encoder.layers.0.self_attn.q_proj"
    sd = {f"{m}.lora_A.weight": torch.ones(4, width), f"{m}.lora_B.weight": torch.ones(width, 4)}
    p = save(str(tmp_path / "peft-te.safetensors"), sd)
    ad = read_adapter(p, strict=True)
    assert ad.modules() == [] and sorted(ad.text_encoder_keys) == sorted(sd)
    host = te_state_dict(sd, {}, p)
    assert sorted(host) == [f"{prefix}text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                            f"{prefix}text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"]


def test_text_encoder_alpha_from_the_header_becomes_a_tensor(tmp_path):
    """Core's CLIP loader reads only .alpha tensors; header alphas (kohya ss_network_alpha, diffusers
    lora_adapter_metadata per encoder, alpha_pattern, rsLoRA) become tensors so the text encoder is scaled like the
    UNet side. An existing .alpha tensor is kept."""
    from fewstep.lora.formats import te_state_dict
    q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    k = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    q2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    sd = {f"{q}.lora_A.weight": torch.ones(8, 768), f"{q}.lora_B.weight": torch.ones(768, 8),
          f"{k}.lora_A.weight": torch.ones(8, 768), f"{k}.lora_B.weight": torch.ones(768, 8),
          f"{q2}.lora_A.weight": torch.ones(16, 1280), f"{q2}.lora_B.weight": torch.ones(1280, 16)}
    meta = {"lora_adapter_metadata": json.dumps({
        "unet.lora_alpha": 99, "text_encoder.lora_alpha": 4, "text_encoder.alpha_pattern": {"self_attn.k_proj": 2},
        "text_encoder_2.lora_alpha": 8, "text_encoder_2.use_rslora": True})}
    host = te_state_dict(sd, meta, "x.safetensors")
    assert host[f"{q}.alpha"].item() == 4 and host[f"{k}.alpha"].item() == 2
    assert host[f"{q2}.alpha"].item() == pytest.approx(8 * 16 / 4)  # host divides by rank 16: 8/sqrt(16) overall
    kohya = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 768),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(3072, 4),
             "lora_te1_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": torch.ones(4, 3072),
             "lora_te1_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": torch.ones(768, 4),
             "lora_te1_text_model_encoder_layers_0_mlp_fc2.alpha": torch.tensor(1.0)}
    host = te_state_dict(kohya, {"ss_network_alpha": "2"}, "k.safetensors")
    assert host["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 2
    assert host["lora_te1_text_model_encoder_layers_0_mlp_fc2.alpha"].item() == 1
    assert set(te_state_dict(kohya, {}, "k.safetensors")) == set(kohya)  # nothing to add without a header


def test_rslora_scale_from_peft_metadata(tmp_path):
    """diffusers' lora_adapter_metadata with use_rslora: PEFT scales by alpha / sqrt(rank)."""
    f = make_factors(rank=16, alpha=8.0)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 16, "unet.lora_alpha": 8.0, "unet.use_rslora": True})}
    p = write_lora(str(tmp_path / "rs.safetensors"), f, U, "peft", alpha_in_tensor=False, metadata=meta)
    plain = write_lora(str(tmp_path / "plain.safetensors"), f, U, "peft", alpha_in_tensor=False,
                       metadata={"lora_adapter_metadata": json.dumps({"unet.r": 16, "unet.lora_alpha": 8.0})})
    ad = read_adapter(p)
    assert {(e.rslora, e.scale) for e in ad.entries} == {(True, 2.0)}
    assert {e.scale for e in read_adapter(plain).entries} == {0.5}
    drs, dpl = deltas_for(p), deltas_for(plain)
    for k in TARGETS:
        assert torch.allclose(drs[k], 4 * dpl[k], rtol=1e-6, atol=1e-6), k
    # an .alpha tensor wins over the header, and rsLoRA then does not apply (it belongs to the header's alpha)
    t = write_lora(str(tmp_path / "t.safetensors"), f, U, "peft", alpha_in_tensor=True, metadata=meta)
    assert {(e.rslora, e.scale) for e in read_adapter(t).entries} == {(False, 0.5)}


def test_lycoris_norm_training_and_ai_toolkit_dora(tmp_path):
    """LyCORIS train_norm writes <m>.w_norm / <m>.b_norm: diffs of the norm weight and bias (as core applies
    them). ai-toolkit's DoRA magnitude <m>.magnitude is read as a PEFT-convention magnitude."""
    from fewstep.lora.adapters import DORA_NORM_PEFT, BiasDiffModule, DiffModule
    m = "lora_unet_down_blocks_0_attentions_0_norm"
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {f"{m}.w_norm": torch.full((320,), 0.01), f"{m}.b_norm": torch.full((320,), 0.02),
          f"{q}.lora_down.weight": torch.ones(4, 320), f"{q}.lora_up.weight": torch.ones(320, 4),
          f"{q}.magnitude": torch.ones(320)}
    ad = read_adapter(save(str(tmp_path / "norm.safetensors"), sd), strict=True)
    kinds = {(e.name, type(e).__name__) for e in ad.entries}
    assert kinds == {(m, "DiffModule"), (m, "BiasDiffModule"), (q, "LoraModule")}
    w = next(e for e in ad.entries if isinstance(e, DiffModule))
    b = next(e for e in ad.entries if isinstance(e, BiasDiffModule))
    assert torch.equal(w.diff, sd[f"{m}.w_norm"]) and torch.equal(b.diff, sd[f"{m}.b_norm"])
    lo = next(e for e in ad.entries if isinstance(e, LoraModule))
    assert lo.dora_norm == DORA_NORM_PEFT and torch.equal(lo.dora_scale, sd[f"{q}.magnitude"])
    with pytest.raises(ValueError, match=r"has two bias deltas"):
        read_adapter(save(str(tmp_path / "two.safetensors"), {f"{m}.w_norm": torch.ones(320),
                                                              f"{m}.b_norm": torch.ones(320),
                                                              f"{m}.diff_b": torch.ones(320)}))


def test_lora_package_never_imports_comfy():
    """lora/ (adapter kinds included) gets every host fact as a value from the node layer."""
    import pathlib
    import fewstep.lora as lora
    files = sorted(pathlib.Path(lora.__file__).parent.rglob("*.py"))
    assert any(p.parent.name == "adapters" for p in files), files
    for path in files:
        src = path.read_text()
        assert "import comfy" not in src and "from comfy" not in src, path


def test_every_adapter_kind_is_registered_and_named_in_the_tensor_table():
    """Each module of lora/adapters with a KIND is in ADAPTERS, and formats reads every suffix a kind declares."""
    import importlib
    import pathlib
    from fewstep.lora import adapters, formats
    mods = [p.stem for p in pathlib.Path(adapters.__file__).parent.glob("*.py") if p.stem not in ("__init__", "base")]
    kinds = [importlib.import_module(f"fewstep.lora.adapters.{m}").KIND for m in mods]
    assert sorted(k.name for k in kinds) == sorted(k.name for k in adapters.ADAPTERS)
    for kind in adapters.ADAPTERS:
        for s in kind.suffixes:
            assert formats.split_key("lora_unet_x" + s.suffix) == ("lora_unet_x" + s.module_tail, s.role, s.style), s
