"""Tier b: FewStep LoRA Fuse on the DiT families (Flux, SD3, Wan, Qwen-Image, HunyuanVideo) against the real host.

The models are the host's own classes at a small width (``_dit.small_model``); the LoRA files are written in each
trainer's key format (``_dit.FORMATS``, names spelled out by hand), and every fused weight is checked against an
independent float64 computation of W + s·ΔW (within one fp32 rounding), then unpatched bit for bit.
"""
from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _dit  # noqa: E402

pytestmark = pytest.mark.host

CASES = [(fam, fmt) for fam, fmts in _dit.FORMATS.items() for fmt in fmts if fmt != "i2v"]
# Formats core ComfyUI 0.3.75 maps completely (the others it drops in part: "lora key not loaded").
CORE_MAPS = {("flux", "bfl"), ("flux", "kohya"), ("flux", "diffusers"), ("flux", "onetrainer"), ("sd3", "kohya"),
             ("sd3", "diffusers"), ("sd3", "peft"), ("sd3", "onetrainer"), ("wan", "native"), ("wan", "musubi"),
             ("qwen_image", "lightning"), ("qwen_image", "diffusers"), ("qwen_image", "kohya"),
             ("hunyuan_video", "diffusion_pipe")}


@pytest.fixture(scope="module")
def L(host):
    from fewstep.nodes import lora
    return lora


@pytest.fixture(scope="module")
def loras(host, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("dit-loras")
    folder_paths.add_model_folder_path("loras", str(d))
    yield d
    folder_paths.folder_names_and_paths["loras"][0].remove(str(d))


_MODELS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _MODELS.clear()


def model(family: str, dtype=torch.float32):
    if (family, dtype) not in _MODELS:
        _MODELS[(family, dtype)] = _dit.small_model(family, dtype)
    return _MODELS[(family, dtype)]


def shapes_of(m) -> dict:
    return {k: tuple(v.shape) for k, v in m.model.state_dict().items()}


def patched(m, keys) -> dict:
    """Patched values of ``keys`` (the host's patch code), then unpatch."""
    import comfy.utils
    try:
        for k in keys:
            m.patch_weight_to_device(k)
        return {k: comfy.utils.get_attr(m.model, k).detach().clone() for k in keys}
    finally:
        m.unpatch_model()


def current(m, keys) -> dict:
    import comfy.utils
    return {k: comfy.utils.get_attr(m.model, k).detach().clone() for k in keys}


def assert_one_rounding(got: torch.Tensor, exact: torch.Tensor, what: str):
    """|got − exact| within one rounding of the weight's dtype (+ fp32 GEMM accumulation)."""
    eps = torch.finfo(got.dtype).eps
    tol = eps * exact.abs() + 4 * torch.finfo(torch.float32).eps * exact.abs().max()
    err = (got.double() - exact).abs()
    assert (err <= tol).all(), f"{what}: off by {(err - tol).max().item():.3g} beyond one rounding"


@pytest.mark.parametrize("family,fmt", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_format_fuses_exactly_and_unpatches_bit_exact(L, loras, family, fmt):
    m0 = model(family)
    name = f"{family}-{fmt}.safetensors"
    want = _dit.write_lora(loras / name, family, fmt, shapes_of(m0))
    n_mod = len(_dit.FORMATS[family][fmt])
    before = current(m0, want)
    m, report, _ = L.fuse(m0, L.NONE, 1.0, [(name, 0.7)])
    assert f"matched {n_mod}/{n_mod}" in report, report
    assert set(m.patches) == set(want), sorted(set(m.patches) ^ set(want))
    got = patched(m, want)
    for k, d in want.items():
        assert_one_rounding(got[k], before[k].double() + 0.7 * d, f"{name} {k}")
    after = current(m0, want)
    assert all(torch.equal(after[k], before[k]) for k in want), "unpatch is not bit-exact"
    assert not m0.patches and not m0.backup


@pytest.mark.parametrize("family,fmt", sorted(CORE_MAPS), ids=[f"{a}-{b}" for a, b in sorted(CORE_MAPS)])
def test_core_loader_agrees_where_it_maps(L, loras, family, fmt):
    """Where core's LoraLoaderModelOnly maps the format, it lands on the same weights (row ranges and swapped
    halves included) within rounding."""
    import nodes
    m0 = model(family)
    name = f"{family}-{fmt}.safetensors"
    want = _dit.write_lora(loras / name, family, fmt, shapes_of(m0))
    ours = patched(L.fuse(m0, L.NONE, 1.0, [(name, 0.7)])[0], want)
    core = nodes.LoraLoaderModelOnly().load_lora_model_only(m0, name, 0.7)[0]
    theirs = patched(core, want)
    for k in want:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("family,fmt", [("wan", "diffusers"), ("hunyuan_video", "musubi"),
                                        ("hunyuan_video", "diffusers")])
def test_formats_core_drops_are_applied(L, loras, family, fmt, caplog):
    """diffusers-named Wan and HunyuanVideo keys and musubi-tuner's HunyuanVideo names: core ComfyUI 0.3.75 logs
    "lora key not loaded" and leaves those weights; the fuse applies every module."""
    import nodes
    m0 = model(family)
    name = f"{family}-{fmt}-core.safetensors"
    want = _dit.write_lora(loras / name, family, fmt, shapes_of(m0))
    with caplog.at_level(logging.WARNING):
        core = nodes.LoraLoaderModelOnly().load_lora_model_only(m0, name, 1.0)[0]
    before = current(m0, want)
    untouched = [k for k, v in patched(core, want).items() if torch.equal(v, before[k])]
    assert untouched and "lora key not loaded" in caplog.text, "core now maps this format; update the docs"
    m, report, _ = L.fuse(m0, L.NONE, 1.0, [(name, 1.0)])
    got = patched(m, want)
    assert all(not torch.equal(got[k], before[k]) for k in want)


WRONG = [("flux", "kohya", "wan"), ("wan", "musubi", "flux"), ("sd3", "diffusers", "qwen_image"),
         ("qwen_image", "kohya", "hunyuan_video"), ("hunyuan_video", "musubi", "sd3")]


@pytest.mark.parametrize("lora_family,fmt,model_family", WRONG, ids=[f"{a}-on-{c}" for a, _, c in WRONG])
def test_wrong_family_refused_with_both_names(L, loras, lora_family, fmt, model_family):
    from fewstep.lora.families import label
    name = f"{lora_family}-{fmt}-wrong.safetensors"
    _dit.write_lora(loras / name, lora_family, fmt, shapes_of(model(lora_family)))
    m0 = model(model_family)
    with pytest.raises(ValueError) as err:
        L.fuse(m0, L.NONE, 1.0, [(name, 1.0)])
    msg = str(err.value)
    assert msg.startswith("FewStep LoRA Fuse: ") and name in msg, msg
    assert f"made for {label(lora_family)} but the model is {label(model_family)}" in msg, msg
    assert not m0.patches


def test_sd_lora_refused_on_a_dit_and_dit_lora_on_sd(L, loras, standin_dir):
    import comfy.sd
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(standin_dir / "loras"))
    with pytest.raises(ValueError, match=r"made for SD1\.5 but the model is Flux"):
        L.fuse(model("flux"), L.NONE, 1.0, [("style-sd15-kohya.safetensors", 1.0)])
    ckpt = standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"
    sd15 = comfy.sd.load_checkpoint_guess_config(str(ckpt))[0]
    _dit.write_lora(loras / "flux-on-sd.safetensors", "flux", "kohya", shapes_of(model("flux")))
    with pytest.raises(ValueError, match=r"made for Flux but the model is SD1\.5"):
        L.fuse(sd15, L.NONE, 1.0, [("flux-on-sd.safetensors", 1.0)])


def test_i2v_keys_on_a_t2v_model_are_one_report_line(L, loras, caplog):
    """An image-to-video Wan LoRA (image cross-attention k_img / v_img) on a text-to-video model: the modules the
    model has are fused, the I2V-only ones are named once in the report -- no warning per key, no error; on the
    I2V model every module lands."""
    i2v = model("wan_i2v")
    want = _dit.write_lora(loras / "wan-i2v.safetensors", "wan", "i2v", shapes_of(i2v))
    t2v = model("wan")
    with caplog.at_level(logging.INFO):
        m, report, _ = L.fuse(t2v, L.NONE, 1.0, [("wan-i2v.safetensors", 1.0)])
    assert "matched 1/3" in report and "2 image-to-video modules" in report, report
    assert set(m.patches) == {"diffusion_model.blocks.0.cross_attn.q.weight"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "k_img" in r.getMessage()]
    m, report, _ = L.fuse(i2v, L.NONE, 1.0, [("wan-i2v.safetensors", 1.0)])
    assert "matched 3/3" in report and set(m.patches) == set(want), report


def _extras_file(path, m0):
    """lightx2v-style extras on the Wan model: bias diffs, a norm diff, the 3-D modulation diff, a PEFT lora_bias."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(5)
    s = shapes_of(m0)
    p = "diffusion_model."
    sd = {p + "blocks.0.self_attn.q.diff_b": torch.randn(s[p + "blocks.0.self_attn.q.bias"], generator=g),
          p + "blocks.1.norm3.diff": torch.randn(s[p + "blocks.1.norm3.weight"], generator=g) * 0.1,
          p + "blocks.1.norm3.diff_b": torch.randn(s[p + "blocks.1.norm3.bias"], generator=g) * 0.1,
          p + "blocks.0.modulation.diff": torch.randn(s[p + "blocks.0.modulation"], generator=g) * 0.1,
          "transformer.blocks.1.ffn.net.2.lora_A.weight": torch.randn(4, s[p + "blocks.1.ffn.2.weight"][1],
                                                                      generator=g),
          "transformer.blocks.1.ffn.net.2.lora_B.weight": torch.randn(s[p + "blocks.1.ffn.2.weight"][0], 4,
                                                                      generator=g),
          "transformer.blocks.1.ffn.net.2.lora_B.bias": torch.randn(s[p + "blocks.1.ffn.2.bias"], generator=g)}
    save_file(sd, str(path), metadata={"lora_adapter_metadata": '{"r": 4, "lora_alpha": 2}'})
    want = {p + "blocks.0.self_attn.q.bias": sd[p + "blocks.0.self_attn.q.diff_b"].double(),
            p + "blocks.1.norm3.weight": sd[p + "blocks.1.norm3.diff"].double(),
            p + "blocks.1.norm3.bias": sd[p + "blocks.1.norm3.diff_b"].double(),
            p + "blocks.0.modulation": sd[p + "blocks.0.modulation.diff"].double(),
            p + "blocks.1.ffn.2.weight": 0.5 * (sd["transformer.blocks.1.ffn.net.2.lora_B.weight"].double()
                                                @ sd["transformer.blocks.1.ffn.net.2.lora_A.weight"].double()),
            p + "blocks.1.ffn.2.bias": 0.5 * sd["transformer.blocks.1.ffn.net.2.lora_B.bias"].double()}
    return want


def test_bias_norm_and_modulation_diffs_and_peft_lora_bias(L, loras):
    m0 = model("wan")
    want = _extras_file(loras / "wan-extras.safetensors", m0)
    before = current(m0, want)
    m, report, _ = L.fuse(m0, L.NONE, 1.0, [("wan-extras.safetensors", 0.5)])
    assert set(m.patches) == set(want), report
    got = patched(m, want)
    for k, d in want.items():
        assert_one_rounding(got[k], before[k].double() + 0.5 * d, k)
    assert all(torch.equal(v, before[k]) for k, v in current(m0, want).items())


def test_block_weights_and_lines_on_dit_layouts(L, loras):
    """Flux's vector follows LoRA-Block-Weight (CLIP, T5, IN, D.., S.., OUT; or the blocks alone): a zero block is
    left untouched; a wrong length is refused naming the layout and its slots; LiNeS scales by depth over the double
    then single blocks."""
    m0 = model("flux")
    entries = [("lora_unet_double_blocks_0_img_attn_proj", "double_blocks.0.img_attn.proj", None),
               ("lora_unet_double_blocks_1_img_attn_proj", "double_blocks.1.img_attn.proj", None),
               ("lora_unet_single_blocks_0_linear2", "single_blocks.0.linear2", None),
               ("lora_unet_single_blocks_1_linear2", "single_blocks.1.linear2", None),
               ("lora_unet_img_in", "img_in", None)]
    want = _dit.write_lora(loras / "flux-bw.safetensors", "flux", "kohya", shapes_of(m0), entries=entries)
    keys = list(want)
    m, report, _ = L.fuse(m0, L.NONE, 1.0, [("flux-bw.safetensors", 1.0)], block_weights="1,0,1,1")
    assert "diffusion_model.double_blocks.1.img_attn.proj.weight" not in m.patches
    assert len(m.patches) == 4, report
    m, _, _ = L.fuse(m0, L.NONE, 1.0, [("flux-bw.safetensors", 1.0)], block_weights="1,1,0,1,1,1,1,0")  # IN=0, OUT
    assert "diffusion_model.img_in.weight" not in m.patches and len(m.patches) == 4
    with pytest.raises(ValueError, match=r"flux block weights need 4 or 8 values, got 3 \(slots: D00,D01,S00,S01; "
                                         r"or CLIP,T5,IN,D00,D01,S00,S01,OUT\)"):
        L.fuse(m0, L.NONE, 1.0, [("flux-bw.safetensors", 1.0)], block_weights="1,1,1")
    with pytest.raises(ValueError, match=r"preset INS needs input and output blocks; the flux layout has none"):
        L.fuse(m0, L.NONE, 1.0, [("flux-bw.safetensors", 1.0)], block_weights="INS")
    before = current(m0, keys)
    m, _, _ = L.fuse(m0, L.NONE, 1.0, [("flux-bw.safetensors", 1.0)], lines_alpha=0.2, lines_beta=0.6)
    got = patched(m, keys)
    for k, lam in zip(keys, (0.2, 0.4, 0.6, 0.8, 0.2)):  # depth 1..4 of 4 blocks; img_in is outside: alpha
        assert_one_rounding(got[k], before[k].double() + lam * want[k], k)


def test_dora_on_a_fused_qkv_split_follows_peft_and_lycoris(L, loras):
    """DoRA on diffusers' separate to_q of Flux's fused qkv (PEFT magnitude, [out]) and on a whole weight (LyCORIS
    dora_scale [out, 1]): the merged weight of those rows is normalised per output row, as the trainers train it."""
    from safetensors.torch import save_file
    m0 = model("flux")
    sh = shapes_of(m0)
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    proj = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    h = sh[qkv][1]
    w = current(m0, [qkv, proj])
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(4, h, generator=g) * 0.3, torch.randn(h, 4, generator=g) * 0.3
    mq = w[qkv][:h].norm(dim=1) * 1.1
    a2, b2 = torch.randn(4, h, generator=g) * 0.3, torch.randn(h, 4, generator=g) * 0.3
    mp = w[proj].norm(dim=1, keepdim=True) * 0.9
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
               "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": mq,
               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a2,
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b2,
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0),
               "lora_unet_double_blocks_0_img_attn_proj.dora_scale": mp}, str(loras / "flux-dora.safetensors"))

    def dora(w0, d, m, s):
        merged = w0.double() + d
        return w0.double() + s * (merged * m.double().reshape(-1, 1) / (merged.norm(dim=1, keepdim=True)
                                                                        + torch.finfo(torch.float32).eps) - w0.double())
    m, report, _ = L.fuse(m0, L.NONE, 1.0, [("flux-dora.safetensors", 0.8)])
    got = patched(m, [qkv, proj])
    want_q = w[qkv].double().clone()
    want_q[:h] = dora(w[qkv][:h], b.double() @ a.double(), mq, 0.8)
    assert_one_rounding(got[qkv], want_q, "PEFT DoRA on to_q rows")
    assert torch.equal(got[qkv][h:], w[qkv][h:])  # k and v rows untouched
    assert_one_rounding(got[proj], dora(w[proj], b2.double() @ a2.double(), mp, 0.8), "LyCORIS DoRA [out, 1]")


def test_bad_dora_shape_refused_at_the_fuse_node(L, loras):
    """A dora_scale that fits neither axis is refused when the fuse node runs -- naming the file and the tensor --
    and leaves no weight patched, however the model is loaded afterwards."""
    from safetensors.torch import save_file
    m0 = model("wan")
    sh = shapes_of(m0)
    k = "diffusion_model.blocks.0.self_attn.q.weight"
    out, inn = sh[k]
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, inn),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(out, 2),
               "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(out + 1, 1)},
              str(loras / "bad-dora.safetensors"))
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*bad-dora\.safetensors: 'diffusion_model\.blocks\.0\.self_"
                                         r"attn\.q\.dora_scale' \(DoRA magnitude\) has shape \(65, 1\)"):
        L.fuse(m0, L.NONE, 1.0, [("bad-dora.safetensors", 1.0)])
    assert not m0.patches and not m0.backup


def _wan_accel_entries():
    """Every linear of the small Wan model's blocks plus its embeddings and head (lightx2v / CausVid coverage)."""
    out = [(f"diffusion_model.blocks.{b}.{a}.{p}", f"blocks.{b}.{a}.{p}", None)
           for b in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"]
    out += [(f"diffusion_model.blocks.{b}.ffn.{i}", f"blocks.{b}.ffn.{i}", None) for b in range(2) for i in (0, 2)]
    out += [(f"diffusion_model.{p}", p, None) for p in ("text_embedding.0", "time_embedding.0", "head.head")]
    return out


def test_wan22_expert_called_out_and_acceleration_shaped_headline(L, loras):
    m0 = model("wan")
    sh = shapes_of(m0)
    high = "Wan2.2-Lightning_T2V-v1.1-A14B-4steps-lora_HIGH_fp16.safetensors"
    _dit.write_lora(loras / high, "wan", "native", sh, rank=64, entries=_wan_accel_entries())
    _, report, preset = L.fuse(m0, high, 1.0, [], model_file="wan2.2_t2v_low_noise_14B_fp16.safetensors")
    assert preset == "Wan 2.2 Lightning 4-step" and "(high-noise expert)" in report, report
    assert ("WARNING: this is the Wan 2.2 high-noise expert's LoRA, but the model is the low-noise expert "
            "(wan2.2_t2v_low_noise_14B_fp16.safetensors): fuse it into the high-noise model") in report, report
    _, report, _ = L.fuse(m0, high, 1.0, [], model_file="wan2.2_t2v_high_noise_14B_fp16.safetensors")
    assert "WARNING" not in report, report
    _, report, _ = L.fuse(m0, high, 1.0, [])
    assert "the model's expert cannot be told from the workflow" in report, report
    _dit.write_lora(loras / "renamed_distill.safetensors", "wan", "native", sh, rank=64,
                    entries=_wan_accel_entries())
    _, report, preset = L.fuse(m0, "renamed_distill.safetensors", 1.0, [])
    assert preset == L.NONE
    assert "detected: acceleration-shaped LoRA of an unknown release" in report, report
    assert "not a recognised acceleration LoRA" not in report, report


def test_model_file_from_the_workflow(host):
    from fewstep.nodes.lora_host import model_file_from_prompt
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_low_noise.safetensors"}},
              "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "x"}},
              "3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 5.0}},
              "4": {"class_type": "FewStepLoraFuse", "inputs": {"model": ["3", 0]}}}
    assert model_file_from_prompt(prompt, "4") == "wan2.2_low_noise.safetensors"
    assert model_file_from_prompt(prompt, 4) == "wan2.2_low_noise.safetensors"
    assert model_file_from_prompt({"4": {"inputs": {"model": ["9", 0]}}}, "4") == ""
    assert model_file_from_prompt(None, None) == ""
