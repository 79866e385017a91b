"""Tier c: FewStep LoRA Fuse on every DiT stand-in family through a real ComfyUI server.

Each family's core workflow (``flow_workflows``: UNETLoader -> model sampling -> KSampler euler -> VAE decode ->
save) gets a FewStep LoRA Fuse after the loader with an acceleration LoRA and two style LoRAs in different key
formats (the stand-ins of ``tools/standins`` plus a few written here: a kohya Qwen-Image style, a PEFT-named SD3 style,
a diffusers-named FastVideo LoRA for HunyuanVideo). The run must succeed, the fuse's report must name the detected
preset and match every module, and the images / frames must be written and not flat. Wan 2.2 A14B fuses each
expert's Lightning LoRA into its expert (lightx2v and two styles on the high-noise one); a high-noise LoRA fused into
the low-noise expert is called out in the report.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

pytestmark = pytest.mark.e2e

FLOW_DIR = Path(__file__).resolve().parent / "flow_workflows"
FUSE = {"accel_strength": 1.0, "style_lora_1": "none", "style_strength_1": 1.0, "style_lora_2": "none",
        "style_strength_2": 1.0, "style_lora_3": "none", "style_strength_3": 1.0, "merge_mode": "linear",
        "density": 0.2, "drop_p": 0.5, "seed": 0, "block_weights": "", "lines_alpha": 1.0, "lines_beta": 0.0,
        "on_unmatched": "error"}

# workflow -> [(loader node, sampling node fed by the loader, accel, [(style, strength), ...], expected preset)]
CASES = {
    "wan22_a14b": [("1", "2", "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64_standin.safetensors",
                    [("style-wan-diffusers-peft_standin.safetensors", 0.8),
                     ("style-wan21-i2v-kijai_standin.safetensors", 0.6)], "Wan 2.1 lightx2v 4-step"),
                   ("11", "12", "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1_low_noise_model_standin.safetensors",
                    [], "Wan 2.2 Lightning 4-step")],
    "wan21_t2v": [("1", "2", "Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32_standin.safetensors",
                   [("style-wan-musubi_standin.safetensors", 0.8)], "Wan 2.1 CausVid")],
    "qwen_image": [("1", "2", "Qwen-Image-Lightning-8steps-V1.0_standin.safetensors",
                    [("style-qwen-image-diffusers-peft_standin.safetensors", 0.8),
                     ("style-qwen-image-kohya_e2e.safetensors", 0.5)], "Qwen-Image-Lightning 8-step")],
    "flux": [("1", "2", "FLUX.1-Turbo-Alpha_standin.safetensors",
              [("style-flux-kohya_standin.safetensors", 0.8), ("style-flux-ai-toolkit_standin.safetensors", 0.5)],
              "FLUX.1 Turbo-Alpha 8-step")],
    "sd3": [("1", "2", "Hyper-SD3-4steps-CFG-lora_standin.safetensors",
             [("style-sd3-kohya_standin.safetensors", 0.8), ("style-sd3-peft_e2e.safetensors", 0.5)],
             "Hyper-SD3 4-step")],
    "hunyuan_video": [("1", "2", "hyvideo_FastVideo_LoRA_e2e.safetensors",
                       [("style-hunyuan-video-musubi_standin.safetensors", 0.8),
                        ("style-hunyuan-video-diffusion-pipe_standin.safetensors", 0.5)], "HunyuanVideo FastVideo")],
}


def _shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _lora(path: Path, modules: dict, rank: int, kohya: bool, seed: int) -> None:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inn) in modules.items():
        down = torch.randn(rank, inn, generator=g) / inn ** 0.5
        up = torch.randn(out, rank, generator=g) * 0.02
        if kohya:
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
        else:
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
    save_file(sd, str(path))


def _extra_loras(root: Path, loras: Path) -> None:
    """The LoRAs the stand-ins lack: a kohya Qwen-Image style, a PEFT-named SD3 style, a FastVideo-named diffusers
    LoRA on HunyuanVideo's attention (every double and single block, rank 32)."""
    from tools import standins
    dm = root / "diffusion_models"
    q = _shapes(dm / standins.diffusion_model_name("qwen_image"))
    mods = {f"lora_unet_transformer_blocks_0_attn_{p}": q[f"transformer_blocks.0.attn.{p}.weight"]
            for p in ("to_q", "to_v", "add_k_proj")}
    _lora(loras / "style-qwen-image-kohya_e2e.safetensors", mods, 8, True, 1)
    s = _shapes(dm / standins.diffusion_model_name("sd3"))
    h = s["model.diffusion_model.joint_blocks.0.x_block.attn.proj.weight"][0]
    mods = {f"base_model.model.transformer_blocks.{b}.attn.{p}": (h, h) for b in (0, 1) for p in ("to_q", "to_k")}
    _lora(loras / "style-sd3-peft_e2e.safetensors", mods, 8, False, 2)
    v = _shapes(dm / standins.diffusion_model_name("hunyuan_video"))
    h = v["img_in.proj.weight"][0]
    n_double = len({k.split(".")[1] for k in v if k.startswith("double_blocks.")})
    n_single = len({k.split(".")[1] for k in v if k.startswith("single_blocks.")})
    mods = {f"transformer.transformer_blocks.{b}.attn.{p}": (h, h) for b in range(n_double)
            for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    mods.update({f"transformer.single_transformer_blocks.{b}.attn.{p}": (h, h) for b in range(n_single)
                 for p in ("to_q", "to_k", "to_v")})
    _lora(loras / "hyvideo_FastVideo_LoRA_e2e.safetensors", mods, 32, False, 3)


@pytest.fixture(scope="module")
def dit_server(tmp_path_factory):
    """A server whose model folders are the flow stand-ins', with a loras folder holding their LoRAs and the ones
    written here."""
    from tools import hostenv, standins
    root = standins.ensure(tuple(standins.FLOW_FAMILIES))
    stage = tmp_path_factory.mktemp("dit-standins")
    for sub in root.iterdir():
        if sub.is_dir() and sub.name != "loras":
            os.symlink(sub, stage / sub.name)
    loras = stage / "loras"
    loras.mkdir()
    for f in (root / "loras").iterdir():
        os.symlink(f, loras / f.name)
    _extra_loras(root, loras)
    srv = hostenv.Server(output_dir=tmp_path_factory.mktemp("dit-out"), standin_dir=stage, test_nodes=True)
    srv.start()
    yield srv
    srv.stop()


def with_fuses(name: str, fuses) -> tuple[dict, list[str]]:
    """The family's core workflow with a FewStep LoRA Fuse after each listed loader."""
    prompt = json.loads((FLOW_DIR / f"{name}.json").read_text())
    ids = []
    for i, (loader, sampling, accel, styles, _preset) in enumerate(fuses):
        fid = str(40 + i)
        inputs = {**copy.deepcopy(FUSE), "model": [loader, 0], "accel_lora": accel}
        for j, (style, strength) in enumerate(styles, 1):
            inputs[f"style_lora_{j}"], inputs[f"style_strength_{j}"] = style, strength
        prompt[fid] = {"class_type": "FewStepLoraFuse", "inputs": inputs}
        assert prompt[sampling]["inputs"]["model"] == [loader, 0]
        prompt[sampling]["inputs"]["model"] = [fid, 0]
        ids.append(fid)
    return prompt, ids


def frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB")).astype(np.float32) for f in ImageSequence.Iterator(im)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_accel_and_two_styles_fuse_and_sample(dit_server, name):
    from tools import hostenv
    prompt, ids = with_fuses(name, CASES[name])
    entry = dit_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", hostenv.error_message(entry) + "\n" + dit_server.log_tail()
    for fid, (_, _, accel, styles, preset) in zip(ids, CASES[name]):
        report = "\n".join(entry["outputs"][fid]["text"])
        assert f"preset for sampling: {preset}" in report, report
        assert f"-> preset {preset} (confidence high)" in report, report
        for f in (accel, *(s for s, _ in styles)):
            assert f in report, (f, report)
        assert "unmatched 0" in report and "WARNING" not in report, report
    imgs = [f for p in dit_server.images(entry) for f in frames(p)]
    video = name.startswith(("wan", "hunyuan"))
    assert len(imgs) == (5 if video else 1), (name, len(imgs))
    for arr in imgs:
        assert np.isfinite(arr).all() and arr.std() > 1.0, f"{name}: a flat frame"


def test_wan22_high_noise_lora_on_the_low_noise_expert_is_called_out(dit_server):
    from tools import hostenv
    high = "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1_high_noise_model_standin.safetensors"
    prompt, ids = with_fuses("wan22_a14b", [("11", "12", high, [], "Wan 2.2 Lightning 4-step")])
    entry = dit_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", hostenv.error_message(entry)
    report = "\n".join(entry["outputs"][ids[0]]["text"])
    assert "WARNING: this is the Wan 2.2 high-noise expert's LoRA, but the model is the low-noise expert" in report, \
        report
