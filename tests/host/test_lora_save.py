"""In-process host: FewStep Save Fused writes a checkpoint the host loads back as SD1.5, with the fused weights and the fuse
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
    assert meta["fewstep.other_patched_weights"] == "0"
    reloaded = comfy.sd.load_checkpoint_guess_config(path)[0]
    assert type(reloaded.model.model_config).__name__ == "SD15"
    assert preset == "LCM-LoRA"


def test_save_fused_keeps_text_encoder_parts(host, standin_dir, tmp_path):
    """A CLIP from the fuse's clip output is saved with its LoRA text-encoder patches applied."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths
    from safetensors import safe_open
    from safetensors.torch import save_file
    from fewstep.nodes import lora as L

    loras = tmp_path / "loras"
    loras.mkdir()
    g = torch.Generator().manual_seed(5)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{te}.lora_down.weight": (torch.randn(4, 768, generator=g) * 0.1).half(),
               f"{te}.lora_up.weight": (torch.randn(768, 4, generator=g) * 0.1).half()},
              str(loras / "te-q.safetensors"))
    folder_paths.add_model_folder_path("loras", str(loras))
    try:
        model, clip = comfy.sd.load_checkpoint_guess_config(
            str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"), output_vae=False)[:2]
        fmodel, fclip, rep, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [("te-q.safetensors", 1.0)])
        (ckey,) = fclip.patcher.patches
        base = comfy.utils.get_attr(clip.patcher.model, ckey).detach().clone()
        fclip.patcher.patch_weight_to_device(ckey)
        patched = comfy.utils.get_attr(fclip.patcher.model, ckey).detach().to(torch.float16)
        fclip.patcher.unpatch_model()
        assert not torch.equal(patched, base.to(torch.float16))
        try:
            path = L.save_fused(fmodel, "fewstep_test/te", "fp16", clip=fclip, output_dir=str(tmp_path))
        finally:
            mm.unload_all_models()
        suffix = "text_model.encoder.layers.0.self_attn.q_proj.weight"
        with safe_open(path, "pt") as f:
            (skey,) = [k for k in f.keys() if k.endswith(suffix)]
            assert torch.equal(f.get_tensor(skey), patched), skey
            assert "style:te-q.safetensors@1" in f.metadata()["fewstep.adapters"]
        assert torch.equal(comfy.utils.get_attr(clip.patcher.model, ckey), base), "input CLIP left patched"
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(loras))
