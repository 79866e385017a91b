"""lora.detect: structure outranks names and metadata on every family; the DiT releases from structure and names."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import fewstep.lora.detect as D
from fewstep.lora.detect import detect
from fewstep.lora.families import family

G = torch.Generator().manual_seed(7)


def write(path, modules: dict, rank: int = 8, meta=None, te=False, extras=None):
    """A kohya-style file: module -> (out, in) (or (out, in, k, k) for a conv)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, shape in modules.items():
        sd[name + ".lora_down.weight"] = torch.randn(rank, *shape[1:], generator=G)
        sd[name + ".lora_up.weight"] = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=G)
        sd[name + ".alpha"] = torch.tensor(float(rank))
    if te:
        sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(rank, 8, generator=G)
        sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, rank, generator=G)
    for k, shape in (extras or {}).items():
        sd[k] = torch.randn(shape, generator=G)
    save_file(sd, str(path), metadata=meta)
    return str(path)


# ---------------------------------------------------------------- UNet families

def sd_style(path, te=False, meta=None):
    """UNet-only (or with TE keys) attention-only SD1.5 LoRA: a style LoRA's shape."""
    mods = {f"lora_unet_down_blocks_{b}_attentions_0_transformer_blocks_0_{p}": (320, i)
            for b in (0, 1) for p, i in (("attn1_to_q", 320), ("attn2_to_k", 768), ("attn2_to_v", 768))}
    return write(path, mods, meta=meta, te=te)


def sd_accel(path, meta=None, ctx=768):
    mods = {}
    for blk in ["down_blocks_0_resnets_0", "down_blocks_0_resnets_1", "down_blocks_1_resnets_0",
                "down_blocks_1_resnets_1", "down_blocks_2_resnets_0", "down_blocks_3_resnets_0", "mid_block_resnets_0",
                "up_blocks_0_resnets_0", "up_blocks_1_resnets_0", "up_blocks_2_resnets_0"]:
        mods[f"lora_unet_{blk}_conv1"] = (8, 8, 3, 3)
        mods[f"lora_unet_{blk}_conv2"] = (8, 8, 3, 3)
        mods[f"lora_unet_{blk}_time_emb_proj"] = (8, 16)
    mods["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"] = (8, ctx)
    return write(path, mods, meta=meta)


def test_a_header_hash_counts_only_when_the_payload_agrees(tmp_path, monkeypatch):
    """A style-shaped file whose sshs_model_hash claims LCM-LoRA's hash is not LCM-LoRA; a file whose payload does
    hash to a known release is that release, whatever its header."""
    p = sd_style(tmp_path / "style.safetensors", meta={"sshs_model_hash": "aaebf6360f7d" + "0" * 52})
    d = detect(p)
    assert d.kind == "unknown" and d.preset_name is None and d.confidence != "high", d.evidence
    assert any("the claim is ignored" in e for e in d.evidence)
    p = sd_accel(tmp_path / "renamed.safetensors", meta={"sshs_model_hash": "aaebf6360f7d" + "0" * 52})
    assert detect(p).kind == "unknown"
    monkeypatch.setitem(D.KNOWN_HASHES, D.addnet_hash(p)[:12], ("lcm", "LCM-LoRA", "sd15"))
    d = detect(p)
    assert (d.kind, d.preset_name, d.confidence) == ("lcm", "LCM-LoRA", "high"), d.evidence


@pytest.mark.parametrize("parts", [("lcm-lora-sdv1-5.safetensors",),
                                   ("TCD-SD15", "snapshots", "abc", "pytorch_lora_weights.safetensors"),
                                   ("SD1.5", "lcm", "pytorch_lora_weights.safetensors")])
def test_a_unet_only_style_shaped_file_named_like_a_release_gets_no_preset(tmp_path, parts):
    d = detect(sd_style(tmp_path.joinpath(*parts)))
    assert d.kind == "unknown" and d.preset_name is None and d.confidence == "low", d.evidence
    assert d.structure == "style"
    if parts[0] != "SD1.5":  # a release name (not just a folder called lcm, which counts only with the structure)
        assert any("not treated as an acceleration LoRA" in e for e in d.evidence), d.evidence


def test_release_names_with_the_release_structure(tmp_path):
    d = detect(sd_accel(tmp_path / "lcm-lora-sdv1-5.safetensors"))
    assert (d.kind, d.preset_name, d.confidence, d.base_model) == ("lcm", "LCM-LoRA", "high", "sd15")
    d = detect(sd_accel(tmp_path / "dmd2_sdxl_4step_lora_fp16.safetensors", ctx=2048))
    assert (d.kind, d.preset_name, d.base_model, d.confidence) == ("dmd2", "DMD2 4-step", "sdxl", "high")
    d = detect(sd_accel(tmp_path / "flash-sdxl.safetensors", ctx=2048))
    assert (d.kind, d.preset_name) == ("flash", "Flash Diffusion SDXL 4-step")
    d = detect(sd_accel(tmp_path / "whatever.safetensors"))
    assert d.kind == "unknown" and d.accel_like_structure and d.confidence == "low"
    assert any("structure alone cannot tell" in e for e in d.evidence)


# ---------------------------------------------------------------- DiT families

def wan_modules(blocks=2, dim=64, ffn=128, mlp=True, outside=True, prefix="diffusion_model."):
    mods = {}
    for b in range(blocks):
        for a in ("self_attn", "cross_attn"):
            for p in "qkvo":
                mods[f"{prefix}blocks.{b}.{a}.{p}"] = (dim, dim)
        if mlp:
            mods[f"{prefix}blocks.{b}.ffn.0"] = (ffn, dim)
            mods[f"{prefix}blocks.{b}.ffn.2"] = (dim, ffn)
    if outside:
        mods[prefix + "text_embedding.0"] = (dim, 32)
        mods[prefix + "time_embedding.0"] = (dim, 16)
        mods[prefix + "head.head"] = (16, dim)
    return mods


@pytest.mark.parametrize("name,kind,preset,expert", [
    ("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors", "lightx2v", "Wan 2.1 lightx2v 4-step", ""),
    ("Wan21_CausVid_14B_T2V_lora_rank32.safetensors", "causvid", "Wan 2.1 CausVid", ""),
    ("Wan2.2-Lightning_T2V-v1.1-A14B-4steps-lora_HIGH_fp16.safetensors", "wan22-lightning", "Wan 2.2 Lightning 4-step",
     "high"),
    ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors", "wan22-lightning", "Wan 2.2 Lightning 4-step",
     "low"),
    ("Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors", "wan22-lightning",
     "Wan 2.2 Lightning 4-step", "high"),
])
def test_wan_releases(tmp_path, name, kind, preset, expert):
    d = detect(write(tmp_path / name, wan_modules(), rank=64))
    assert (d.kind, d.preset_name, d.base_model, d.confidence, d.expert) == (kind, preset, "wan", "high", expert), \
        d.evidence


def test_dit_structure_outranks_the_name(tmp_path):
    name = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors"
    d = detect(write(tmp_path / "a" / name, wan_modules(), rank=8))  # a style rank
    assert d.kind == "unknown" and d.preset_name is None and "rank 8 is below" in " ".join(d.evidence), d.evidence
    d = detect(write(tmp_path / "b" / name, wan_modules(mlp=False), rank=64))  # attention only
    assert d.kind == "unknown" and "not every block has attn and mlp" in " ".join(d.evidence), d.evidence
    d = detect(write(tmp_path / "c" / name, wan_modules(), rank=64, te=True))
    assert d.kind == "unknown" and "text-encoder keys" in " ".join(d.evidence), d.evidence
    mods = {k: v for k, v in wan_modules(blocks=3).items() if ".blocks.1." not in k}  # block 1 skipped
    d = detect(write(tmp_path / "d" / name, mods, rank=64))
    assert d.kind == "unknown" and d.structure == "style", d.evidence


def test_dit_structure_without_a_name(tmp_path):
    d = detect(write(tmp_path / "mystery.safetensors", wan_modules(), rank=64))
    assert (d.kind, d.accel_like_structure, d.confidence, d.base_model) == ("unknown", True, "low", "wan")
    d = detect(write(tmp_path / "blocks-only.safetensors", wan_modules(outside=False), rank=64))
    assert d.kind == "unknown" and not d.accel_like_structure and d.structure == "unclear"
    d = detect(write(tmp_path / "style.safetensors", wan_modules(), rank=8))
    assert d.structure == "style" and not d.accel_like_structure


def test_every_block_of_the_loaded_model(tmp_path):
    """With the model's bound block layout, a file must cover every block of it (here 2 of the model's 4)."""
    blocks = family("wan").blocks.bind([f"blocks_{i}_self_attn_q" for i in range(4)])
    p = write(tmp_path / "Wan21_CausVid_14B_T2V_lora_rank32.safetensors", wan_modules(), rank=32)
    assert detect(p).preset_name == "Wan 2.1 CausVid"
    d = detect(p, blocks=blocks)
    assert d.kind == "unknown" and "2 of 4" in " ".join(d.evidence), d.evidence


def sd3_diffusers(attn_only: bool, blocks=2, dim=64):
    mods = {}
    for b in range(blocks):
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            mods[f"transformer.transformer_blocks.{b}.attn.{p}"] = (dim, dim)
        if not attn_only:
            for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
                mods[f"transformer.transformer_blocks.{b}.attn.{p}"] = (dim, dim)
            mods[f"transformer.transformer_blocks.{b}.ff.net.0.proj"] = (4 * dim, dim)
            mods[f"transformer.transformer_blocks.{b}.ff.net.2"] = (dim, 4 * dim)
            mods[f"transformer.transformer_blocks.{b}.ff_context.net.0.proj"] = (4 * dim, dim)
    return mods


def test_sd3_releases_and_their_targets(tmp_path):
    """PCM-SD3 trains the attention projections (diffusers' SD3 LoRA script); Hyper-SD3 every block linear. The SD3
    family comes from the names only SD3 has (joint blocks, or here the file's hint) -- diffusers' transformer_blocks
    names are shared with Flux, HunyuanVideo and Qwen-Image."""
    meta = {"modelspec.architecture": "stable-diffusion-v3-medium/lora"}
    d = detect(write(tmp_path / "pcm_deterministic_4step_shift3.safetensors", sd3_diffusers(True), 64, meta))
    assert (d.kind, d.preset_name, d.confidence) == ("pcm-sd3", "PCM-SD3 4-step", "high"), d.evidence
    d = detect(write(tmp_path / "pcm_deterministic_2step_shift1.safetensors", sd3_diffusers(True), 64, meta))
    assert (d.kind, d.preset_name, d.steps) == ("pcm-sd3", None, 2), d.evidence
    d = detect(write(tmp_path / "pdm_stochastic_shift3.safetensors", sd3_diffusers(True), 64, meta))
    assert d.preset_name == "PCM-SD3 stochastic 4-step", d.evidence
    d = detect(write(tmp_path / "Hyper-SD3-8steps-CFG-lora.safetensors", sd3_diffusers(False), 64, meta))
    assert (d.preset_name, d.base_model, d.confidence) == ("Hyper-SD3 8-step", "sd3", "high"), d.evidence
    d = detect(write(tmp_path / "b" / "Hyper-SD3-8steps-CFG-lora.safetensors", sd3_diffusers(True), 64, meta))
    assert d.kind == "unknown", d.evidence  # attention only: not Hyper-SD3's targets


def test_flux_and_hunyuan_video_share_diffusers_names(tmp_path):
    mods = {f"transformer.transformer_blocks.0.attn.{p}": (64, 64) for p in ("to_q", "to_k", "add_q_proj")}
    mods.update({f"transformer.single_transformer_blocks.0.{p}": (64, 64) for p in ("attn.to_q", "proj_mlp")})
    d = detect(write(tmp_path / "ambiguous.safetensors", mods))
    assert d.base_model is None and set(d.candidates) == {"flux", "hunyuan_video"}, d.evidence
    refiner = {**mods, "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q": (64, 64)}
    assert detect(write(tmp_path / "hv.safetensors", refiner)).base_model == "hunyuan_video"
    assert detect(write(tmp_path / "my-flux-style.safetensors", mods)).base_model == "flux"  # the file name hints
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv": (192, 64), "lora_unet_double_blocks_0_img_mlp_0": (256, 64)}
    d = detect(write(tmp_path / "k.safetensors", kohya))  # BFL names: HunyuanVideo's host names too
    assert d.base_model is None and set(d.candidates) == {"flux", "hunyuan_video"}, d.evidence
    kohya["lora_unet_txt_in"] = (64, 64)  # Flux's plain txt_in (HunyuanVideo's has an input_embedder)
    assert detect(write(tmp_path / "k2.safetensors", kohya)).base_model == "flux"
    musubi = {"lora_unet_double_blocks_0_img_attn_qkv": (192, 64), "lora_unet_double_blocks_0_img_mlp_fc1": (256, 64)}
    assert detect(write(tmp_path / "m.safetensors", musubi)).base_model == "hunyuan_video"


def test_a_release_name_of_another_family_is_a_conflict(tmp_path):
    d = detect(write(tmp_path / "Hyper-SD3-4steps-CFG-lora.safetensors", wan_modules(), rank=64))
    assert d.base_model == "wan" and d.confidence == "low" and any("CONFLICT" in e for e in d.evidence), d.evidence


def test_qwen_image_and_wan22_5b(tmp_path):
    q = {}
    for b in range(2):
        for p in ("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.to_out.0"):
            q[f"transformer_blocks.{b}.{p}"] = (64, 64)
        q[f"transformer_blocks.{b}.img_mlp.net.0.proj"] = (256, 64)
        q[f"transformer_blocks.{b}.txt_mlp.net.2"] = (64, 256)
    d = detect(write(tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors", q, rank=64))
    assert (d.preset_name, d.base_model, d.confidence) == ("Qwen-Image-Lightning 4-step", "qwen_image", "high")
    d = detect(write(tmp_path / "five.safetensors", {"diffusion_model.blocks.0.self_attn.q": (3072, 3072)}, rank=2))
    assert d.base_model == "wan22_5b", d.evidence
