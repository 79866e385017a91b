"""Tier b: FewStep Save Fused writes a checkpoint the host loads back as SD1.5, with the fused weights and the fuse
settings in its metadata, and leaves the shared base model unpatched."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.host

KEYS = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "diffusion_model.input_blocks.1.0.in_layers.2.weight"]


def test_save_fused_round_trip(host, standin_dir, tmp_path):
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths
    from safetensors import safe_open
    folder_paths.add_model_folder_path("loras", str(standin_dir / "loras"))
    from fewstep.nodes import lora as L

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"))[:3]
    before = {k: comfy.utils.get_attr(model.model, k).detach().clone() for k in KEYS}
    fused, _, preset = L.fuse(model, "lcm-lora-sd15-standin.safetensors", 1.0,
                              [("style-sd15-kohya.safetensors", 0.7)])
    expected = {}
    for k in KEYS:
        fused.patch_weight_to_device(k)
        expected[k] = comfy.utils.get_attr(fused.model, k).detach().to(torch.float16)
    fused.unpatch_model()
    try:
        path = L.save_fused(fused, "fewstep_test/fused", "fp16", clip=clip, vae=vae, output_dir=str(tmp_path))
    finally:
        mm.unload_all_models()
    for k in KEYS:  # the shared base model is back to its own weights
        assert torch.equal(comfy.utils.get_attr(model.model, k), before[k])
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        for k in KEYS:
            assert torch.equal(f.get_tensor("model." + k), expected[k]), k
    record = json.loads(meta["fewstep.fuse"])[0]
    assert [a["name"] for a in record["adapters"]] == ["lcm-lora-sd15-standin.safetensors",
                                                       "style-sd15-kohya.safetensors"]
    assert all("path" not in a for a in record["adapters"])
    reloaded = comfy.sd.load_checkpoint_guess_config(path)[0]
    assert type(reloaded.model.model_config).__name__ == "SD15"
    assert preset == "LCM-LoRA"
