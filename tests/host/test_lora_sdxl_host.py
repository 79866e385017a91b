"""In-process host: FewStep LoRA Fuse on the real host's SDXL UNet (built on the meta device: the 6.9 GB stand-in checkpoint is
not needed to check SDXL key mapping, formats, block-weight slots and errors). LoRA files in the real SDXL key
formats are written by the stand-in builder into a temporary loras folder."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

ATTN_Q = "diffusion_model.input_blocks.{}.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def sdxl(host):
    """The host's SDXL model (model_base.SDXL, real module tree and key names) with meta-device weights."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    from tools.standins import UNET_CONFIGS
    cfg = sm.SDXL(dict(UNET_CONFIGS["sdxl"]))
    with torch.device("meta"):
        model = cfg.get_model({})
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


@pytest.fixture(scope="module")
def sdxl_loras(host, tmp_path_factory):
    """kohya (diffusers names), kohya (LDM names) and PEFT attention styles, plus a rank-4 whole-UNet kohya LoRA."""
    import folder_paths
    from tools import standins
    d = tmp_path_factory.mktemp("sdxl-loras")
    files = {"kohya": ("kohya_diffusers", "attn", 4), "kohya-ldm": ("kohya_ldm", "attn", 4),
             "peft": ("peft", "attn", 4), "full": ("kohya_diffusers", "full", 4)}
    for tag, (fmt, layout, rank) in files.items():
        standins.build_lora("sdxl", fmt, layout, rank, 2.0, d / f"xl-{tag}.safetensors")
    folder_paths.add_model_folder_path("loras", str(d))
    yield {tag: f"xl-{tag}.safetensors" for tag in files}
    folder_paths.folder_names_and_paths["loras"][0].remove(str(d))


@pytest.fixture(scope="module")
def L(host):
    from fewstep.nodes import lora
    return lora


def delta(m, key):
    return m.patches[key][-1][1].compute(device=None)


def test_sdxl_formats_map_fully_and_agree(L, sdxl, sdxl_loras):
    fused = {}
    for tag in ("kohya", "kohya-ldm", "peft"):
        m, report, preset = L.fuse(sdxl, L.NONE, 1.0, [(sdxl_loras[tag], 1.0)])
        assert "model SDXL" in report and "matched 560/560, unmatched 0" in report, report
        assert "base model: SDXL" in report, report
        fused[tag] = m
    keys = set(fused["kohya"].patches)
    assert len(keys) == 70 * 8, len(keys)  # 70 SDXL transformer blocks x (attn1 + attn2) x (q, k, v, out)
    for tag in ("kohya-ldm", "peft"):
        assert set(fused[tag].patches) == keys, tag
    for k in (ATTN_Q.format(4), "diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight",
              "diffusion_model.output_blocks.5.1.transformer_blocks.1.attn2.to_out.0.weight"):
        d = delta(fused["kohya"], k)
        assert d.abs().max() > 0
        assert torch.equal(d, delta(fused["kohya-ldm"], k)) and torch.equal(d, delta(fused["peft"], k)), k
    assert not sdxl.patches, "the input model was modified"


def test_sdxl_whole_unet_lora_detected_and_mapped(L, sdxl, sdxl_loras):
    m, report, preset = L.fuse(sdxl, sdxl_loras["full"], 1.0, [])
    for k in ("diffusion_model.input_blocks.1.0.in_layers.2.weight",  # resnet conv
              "diffusion_model.time_embed.0.weight",
              "diffusion_model.input_blocks.4.1.proj_in.weight",
              "diffusion_model.output_blocks.8.0.skip_connection.weight",
              "diffusion_model.input_blocks.6.0.op.weight"):  # downsampler
        assert k in m.patches, f"{k} not patched; report:\n{report}"
    shapes = {k: tuple(v.shape) for k, v in sdxl.model.state_dict().items()}
    k = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert tuple(delta(m, k).shape) == shapes[k]
    assert ", unmatched 0" in report and "base model: SDXL" in report, report
    assert len(m.patches) > 700, len(m.patches)  # every conv / linear weight of the SDXL UNet but conv_in/out


def test_sdxl_block_weight_slots(L, sdxl, sdxl_loras):
    style = [(sdxl_loras["kohya"], 1.0)]
    full, _, _ = L.fuse(sdxl, L.NONE, 1.0, style)
    vec = ["1"] * 12
    vec[1] = "0"  # SDXL 12 slots: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05
    m, _, _ = L.fuse(sdxl, L.NONE, 1.0, style, block_weights=",".join(vec))
    in04 = {k for k in full.patches if k.startswith("diffusion_model.input_blocks.4.")}
    assert len(in04) == 2 * 8 and not in04 & set(m.patches)  # 2 transformer blocks x 8 attention weights
    assert set(full.patches) - set(m.patches) == in04
    k5 = ATTN_Q.format(5)
    assert torch.equal(delta(m, k5), delta(full, k5))
    half, _, _ = L.fuse(sdxl, L.NONE, 1.0, style, block_weights="ALL0.5")
    torch.testing.assert_close(delta(half, k5), 0.5 * delta(full, k5), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse.*(12|20)"):
        L.fuse(sdxl, L.NONE, 1.0, style, block_weights=",".join(["1"] * 17))  # an SD1.5 layout on SDXL


def test_sd15_lora_on_sdxl_names_file_and_base(L, sdxl, standin_dir):
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(standin_dir / "loras"))
    with pytest.raises(ValueError, match=r"style-sd15-kohya.safetensors.*SD1"):
        L.fuse(sdxl, L.NONE, 1.0, [("style-sd15-kohya.safetensors", 1.0)])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_export_names_text_encoder_weights_as_kohya_writes_them(host, arch):
    """FewStep Export LoRA's text-encoder names, from the host's own CLIP models (meta weights): SD1.5's one encoder
    as lora_te_*, SDXL's clip_l / clip_g as lora_te1_* / lora_te2_*; every nameable weight gets exactly one name."""
    import comfy.lora
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from fewstep.nodes import lora_save as S
    cls = comfy.sdxl_clip.SDXLClipModel if arch == "sdxl" else comfy.sd1_clip.SD1ClipModel
    with torch.device("meta"):
        clip_model = cls(device="meta", dtype=torch.float16)
    kmap = comfy.lora.model_lora_keys_clip(clip_model, {})
    names = S.kohya_te_names(kmap)
    targets = {hk for lk, hk in kmap.items() if lk.startswith("lora_te")}
    assert set(names) == targets and len(targets) >= 73  # SD1.5: 12 layers x 6 + text_projection
    assert len(set(names.values())) == len(names)
    for hk, lk in names.items():
        if arch == "sd15":
            has_te = any(k.startswith("lora_te_") and v == hk for k, v in kmap.items())
            assert lk.startswith("lora_te_") or not has_te, (hk, lk)  # e.g. text_projection: only lora_te1_
        else:
            assert lk.startswith("lora_te1_" if hk.startswith("clip_l.") else "lora_te2_"), (hk, lk)
        assert kmap[lk] == hk


def test_ssd1b_lora_refused_on_sdxl_and_ssd1b_model_named(L, sdxl, tmp_path, host):
    """An SSD-1B LoRA (its modules all exist in SDXL with the same shapes) is not fused silently into SDXL: the
    base check names both. The host's SSD-1B config is recognised as its own base."""
    import comfy.supported_models as sm
    import folder_paths
    from safetensors.torch import save_file
    from fewstep.nodes.common import model_base
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(4):  # 4 transformer blocks at the deepest level, no mid-block attention: SSD-1B
        n = f"lora_unet_down_blocks_2_attentions_0_transformer_blocks_{i}_attn2_to_k"
        sd[n + ".lora_down.weight"] = torch.randn(4, 2048, generator=g)
        sd[n + ".lora_up.weight"] = torch.randn(1280, 4, generator=g)
    n = "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd[n + ".lora_down.weight"] = torch.randn(4, 1280, generator=g)
    sd[n + ".lora_up.weight"] = torch.randn(1280, 4, generator=g)
    save_file(sd, str(tmp_path / "lcm-ssd1b-style.safetensors"))
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    try:
        with pytest.raises(ValueError, match=r"lcm-ssd1b-style\.safetensors was made for SSD-1B but the model is SDXL"):
            L.fuse(sdxl, L.NONE, 1.0, [("lcm-ssd1b-style.safetensors", 1.0)])
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))

    class M:  # what model_base reads: model.model.model_config.unet_config
        class model:
            model_config = sm.SSD1B(dict(sm.SSD1B.unet_config))
    assert model_base(M) == "ssd1b" and model_base(sdxl) == "sdxl"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_full_unet_lora_in_ldm_names_looks_like_acceleration(host, tmp_path, kind):
    """A whole-UNet LoRA written with LDM module names (input_blocks_*): its downsamplers (input_blocks_N_0_op) are not
    resnets missing their convs, so the structure reads as an acceleration LoRA and the name gives high confidence."""
    from fewstep.lora.detect import detect
    from tools import standins
    p = tmp_path / f"lcm-lora-{kind}-ldm.safetensors"
    standins.build_lora(kind, "kohya_ldm", "full", 1, 1.0, p)
    d = detect(str(p))
    assert d.kind == "lcm" and d.accel_like_structure and d.confidence == "high", d.evidence


def test_checkpoint_in_the_loras_folder_refused_from_its_header(host, tmp_path):
    from safetensors.torch import save_file
    from fewstep.lora.formats import read_adapter
    p = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(4)}, str(p))
    with pytest.raises(ValueError, match=r"none of its 2 tensors is a LoRA/LyCORIS part .* checkpoint/UNet loader"):
        read_adapter(p)
