"""The flow-family workflows (real file names) as the same graphs on the stand-ins: for the e2e tests and `make demo`.

The workflows in ``workflows/`` name the real files a user puts in ``ComfyUI/models/``. No real weights exist here,
so ``on_standins(prompt)`` rewrites an API prompt of a flow family (SD3, Flux, Wan, Qwen-Image, HunyuanVideo):

* loaders: each real diffusion model and VAE -> its stand-in (``tools/standins``), by the tables below;
* LoRA loaders: the real LoRA -> its stand-in when this checkout's stand-ins define one (``Family.loras``), else the
  loader is left out (its model input passes through) and that is said in the returned notes;
* text encoders (umT5-XXL, T5-XXL, CLIP-G, Qwen2.5-VL: far too large for CI): every ``CLIPTextEncode`` fed by a
  ``CLIPLoader`` / ``DualCLIPLoader`` / ``TripleCLIPLoader`` becomes the test-only ``FewStepTestConditioning`` of
  that family (``tests/custom_nodes``; the server must be started with ``Server(test_nodes=True)``), and the loaders
  go;
* the empty latent gets the family's tiny stand-in size (a few frames for video); ModelSamplingFlux follows it.

Everything else -- the samplers, presets, schedules, guiders, the decode and the save -- runs as written.
"""
from __future__ import annotations

import copy

# Real diffusion-model files of the workflows -> (stand-in family, role in Family.models).
DIFFUSION_MODELS = {
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("wan", "high_noise"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": ("wan", "low_noise"),
    "wan2.1_t2v_14B_fp8_scaled.safetensors": ("wan", "high_noise"),  # the 14B layout
    "wan2.1_t2v_1.3B_fp16.safetensors": ("wan", "t2v"),
    "qwen_image_fp8_e4m3fn.safetensors": ("qwen_image", "model"),
    "flux1-dev.safetensors": ("flux", "model"),
    "sd3_medium.safetensors": ("sd3", "model"),
    "hunyuan_video_t2v_720p_bf16.safetensors": ("hunyuan_video", "model"),
}
# Real VAE files -> stand-in family.
VAES = {"wan_2.1_vae.safetensors": "wan", "qwen_image_vae.safetensors": "qwen_image", "ae.safetensors": "flux",
        "sd3_vae.safetensors": "sd3", "hunyuan_video_vae_bf16.safetensors": "hunyuan_video"}
# Real LoRA files -> the stand-in LoRA mirroring the same release (used when the stand-ins define it).
LORAS = {
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors":
        "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1_high_noise_model_standin.safetensors",
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors":
        "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1_low_noise_model_standin.safetensors",
    "Qwen-Image-Lightning-8steps-V1.0.safetensors": "Qwen-Image-Lightning-8steps-V1.0_standin.safetensors",
    "FLUX.1-Turbo-Alpha.safetensors": "FLUX.1-Turbo-Alpha_standin.safetensors",
    "pcm_deterministic_4step_shift3.safetensors": "pcm_deterministic_4step_shift3_standin.safetensors",
}
TEXT_ENCODER_LOADERS = ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")
EMPTY_LATENTS = ("EmptyHunyuanLatentVideo", "EmptySD3LatentImage", "EmptyLatentImage")
TOKENS = 8  # conditioning length of the stand-in text encoder


def family_of(prompt: dict) -> str | None:
    """The stand-in family of a prompt's diffusion models (None: not a flow-family workflow); one family only."""
    found = {DIFFUSION_MODELS[n["inputs"]["unet_name"]][0] for n in prompt.values()
             if n["class_type"] == "UNETLoader" and n["inputs"].get("unet_name") in DIFFUSION_MODELS}
    if len(found) > 1:
        raise ValueError(f"a workflow mixes the model families {sorted(found)}")
    return found.pop() if found else None


def _encoder_family(loader: dict, default: str) -> str:
    if loader["class_type"] == "TripleCLIPLoader":
        return "sd3"
    return {"wan": "wan", "qwen_image": "qwen_image", "flux": "flux", "sd3": "sd3",
            "hunyuan_video": "hunyuan_video"}.get(loader["inputs"].get("type"), default)


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)


def _drop(prompt: dict, key: str, passthrough) -> None:
    """Remove node ``key``; every link to its output 0 takes ``passthrough`` (a link) instead."""
    del prompt[key]
    for node in prompt.values():
        for name, v in node["inputs"].items():
            if _is_link(v) and str(v[0]) == key:
                if passthrough is None or v[1] != 0:
                    raise ValueError(f"node {name!r} still needs the removed node {key}")
                node["inputs"][name] = list(passthrough)


def on_standins(prompt: dict) -> tuple[dict, list[str]]:
    """(the prompt rewritten for the stand-ins, notes on what was left out); see the module docstring."""
    from tools import standins
    p = copy.deepcopy({str(k): v for k, v in prompt.items()})
    fam_key = family_of(p)
    if fam_key is None:
        raise ValueError("not a flow-family workflow: no UNETLoader names a file of tools/standin_prompts.py")
    fam = standins.family(fam_key)
    defined = {lf.name for lf in fam.loras}
    notes = []
    seed = 0
    for key, node in list(p.items()):
        ct, ins = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            ins["unet_name"] = fam.models[DIFFUSION_MODELS[ins["unet_name"]][1]].name
        elif ct == "VAELoader" and ins.get("vae_name") in VAES:
            ins["vae_name"] = standins.family(VAES[ins["vae_name"]]).vae.name
        elif ct in ("LoraLoaderModelOnly", "LoraLoader") and ins.get("lora_name") in LORAS:
            standin = LORAS[ins["lora_name"]]
            if standin in defined:
                ins["lora_name"] = standin
            else:
                notes.append(f"{ins['lora_name']}: no stand-in LoRA in this checkout, loader left out")
                if ct == "LoraLoader":
                    raise ValueError("LoraLoader (with CLIP) cannot be left out: use LoraLoaderModelOnly")
                _drop(p, key, ins["model"])
        elif ct == "CLIPTextEncode" and _is_link(ins.get("clip")) and \
                p[str(ins["clip"][0])]["class_type"] in TEXT_ENCODER_LOADERS:
            family = _encoder_family(p[str(ins["clip"][0])], fam_key)
            p[key] = {"class_type": "FewStepTestConditioning",
                      "inputs": {"family": family, "seed": seed, "tokens": TOKENS}}
            seed += 1
        elif ct in EMPTY_LATENTS:
            latent_node, size = fam.latent
            p[key] = {"class_type": latent_node, "inputs": dict(size)}
        elif ct == "ModelSamplingFlux":
            ins["width"], ins["height"] = fam.latent[1]["width"], fam.latent[1]["height"]
    for key in [k for k, n in p.items() if n["class_type"] in TEXT_ENCODER_LOADERS]:
        _drop(p, key, None)
    return p, notes
