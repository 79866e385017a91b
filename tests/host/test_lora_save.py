"""Tier b: FewStep Save Fused writes a checkpoint the host loads back as SD1.5, with the fused weights, the fuse
settings, and the prompt and workflow (as core Save Checkpoint writes them) in its metadata, and leaves the shared
base model unpatched."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.host

KEYS = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "diffusion_model.input_blocks.1.0.in_layers.2.weight"]
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def run_save_node(prompt: dict, node_id: str, extra_pnginfo: dict, output_dir, **links):
    """Run FewStep Save Fused as the host's executor does: its hidden inputs (prompt, extra_pnginfo) come from the
    host's own ``execution.get_input_data`` for the node's schema, its widget values from the prompt, its linked
    inputs (``links``) from the caller; the output folder is ``output_dir``. Returns the saved path."""
    import execution
    import folder_paths
    from comfy_api.internal import make_locked_method_func
    from comfy_execution.graph import DynamicPrompt
    from fewstep.nodes.lora_save import FewStepSaveFused as cls
    widgets, _, hidden = execution.get_input_data(prompt[node_id]["inputs"], cls, node_id, None,
                                                  DynamicPrompt(prompt), {"extra_pnginfo": extra_pnginfo})
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(output_dir))
    try:
        run = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE(hidden))
        out = run(**{k: v[0] for k, v in widgets.items() if k not in links}, **links)
    finally:
        folder_paths.set_output_directory(old)
    return out.args[0]


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
    prompt = json.loads((REPO / "workflows" / "api" / "fewstep_lora_fuse.json").read_text())
    assert "99" not in prompt
    prompt["99"] = {"class_type": "FewStepSaveFused",
                    "inputs": {"model": ["2", 0], "clip": ["2", 3], "vae": ["1", 2],
                               "filename_prefix": "fewstep_test/fused", "dtype": "fp16"}}
    extra = {"workflow": json.loads((REPO / "workflows" / "fewstep_lora_fuse.json").read_text())}
    try:
        path = run_save_node(prompt, "99", extra, tmp_path, model=fused, clip=clip, vae=vae)
    finally:
        mm.unload_all_models()
    for k in KEYS:  # the shared base model is back to its own weights
        assert torch.equal(comfy.utils.get_attr(model.model, k), before[k])
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        for k in KEYS:
            assert torch.equal(f.get_tensor("model." + k), expected[k]), k
    # as core Save Checkpoint writes them (comfy_extras/nodes_model_merging.py save_checkpoint)
    assert json.loads(meta["prompt"]) == prompt and meta["prompt"] == json.dumps(prompt)
    assert json.loads(meta["workflow"]) == extra["workflow"] and meta["workflow"] == json.dumps(extra["workflow"])
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
    from fewstep.nodes import lora_save as S

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
            path = S.save_fused(fmodel, "fewstep_test/te", "fp16", clip=fclip, output_dir=str(tmp_path))
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
