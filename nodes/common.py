"""Helpers every node module shares: turning a math error into one naming the node, and the model's family."""
from __future__ import annotations

from .validate import MAX_MESSAGE, cut

SSD1B_DEPTH = [0, 0, 2, 2, 4, 4]  # the host's SSD1B unet_config transformer_depth (SDXL: [0, 0, 2, 2, 10, 10])

# Host model classes (``comfy.model_base``) -> family, by exact class: a subclass with another architecture (Flux2,
# Chroma, HunyuanVideo15, WAN22_S2V, ...) is not taken for its parent. Wan 2.1 (1.3B/14B, T2V and I2V) and the
# Wan 2.2 A14B experts load as WAN21; Wan 2.2 TI2V-5B as WAN22.
HOST_FAMILIES = {"SD3": "sd3", "Flux": "flux", "WAN21": "wan", "WAN22": "wan22_5b", "QwenImage": "qwen_image",
                 "HunyuanVideo": "hunyuan_video"}


def checked(node: str, fn, *args, **kwargs):
    """Run `fn`; a ValueError becomes one naming the node (cut to ``MAX_MESSAGE``), so the user knows what to fix."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ValueError(cut(f"{node}: {e}", MAX_MESSAGE)) from None


def model_base(model) -> str:
    """The model's family: 'sd15', 'sd2', 'sdxl', 'ssd1b' (a UNet, from its config: context width, depth), 'sd3',
    'flux', 'wan', 'wan22_5b', 'qwen_image', 'hunyuan_video' (from the host's model class), else 'unknown'."""
    family = HOST_FAMILIES.get(type(model.model).__name__)
    if family is not None:
        return family
    cfg = getattr(model.model.model_config, "unet_config", {}) or {}
    ctx = cfg.get("context_dim")
    if cfg.get("adm_in_channels") and ctx == 2048:
        return "ssd1b" if list(cfg.get("transformer_depth") or []) == SSD1B_DEPTH else "sdxl"
    return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(ctx, "unknown")


# Each pack node sits in the folder of the core node it pairs with (the node library and search show it there):
CATEGORIES = {
    "ksampler": "sampling",                                 # FewStep Settings, next to KSampler
    "custom": "sampling/custom_sampling",                   # FewStep Preset, next to SamplerCustom(Advanced)
    "samplers": "sampling/custom_sampling/samplers",        # next to KSamplerSelect
    "schedulers": "sampling/custom_sampling/schedulers",    # next to BasicScheduler
    "noise": "sampling/custom_sampling/noise",              # next to RandomNoise
    "loaders": "loaders",                                   # FewStep LoRA Fuse / Stack, next to Load LoRA
    "save": "advanced/model_merging",                       # Save Fused / Export LoRA, next to Save Checkpoint
}


def advanced(inp):
    """Mark a widget input "advanced": the frontend hides it until the node's context menu says Show Advanced
    (its value is still saved and sent). The host's V3 inputs take no such argument, so the flag goes into the
    input's ``extra_dict``, which ``as_dict`` writes into /object_info."""
    inp.extra_dict["advanced"] = True
    return inp
