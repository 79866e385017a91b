"""Stand-in models: real architectures and key layouts with seeded random weights, detected by the host's loaders.

No real weights can be downloaded here or in CI, so tests, the demo and the benchmarks use these.  One module per
family builds its files; this module is the API and the one list of families:

* SD1.5 / SDXL checkpoints and LoRA files (``sd.py``): kinds ``"sd15"``, ``"sdxl"``.
* Flow-matching / DiT families (``flow.py`` and one module each): ``"sd3"``, ``"flux"``, ``"wan"`` (Wan 2.1 T2V
  1.3B-style and the two Wan 2.2 A14B experts), ``"qwen_image"``, ``"hunyuan_video"``.  Each has diffusion-model
  files for core ``UNETLoader``, a VAE for core ``VAELoader`` and LoRA files (``dit_loras.py``).  Their text
  encoders are replaced in tests only, by the ``FewStepTestConditioning`` node (tests/custom_nodes).

Files are cached by content hash (of this package and the host version) under
``$FEWSTEP_CACHE/standins/<hash>/{checkpoints,loras,diffusion_models,vae}`` -- outside the repository, never
committed -- and built on demand by ``ensure(kinds)``.

Usage: ``python -m tools.standins [sd15] [sdxl] [sd3] [flux] [wan] [qwen_image] [hunyuan_video] [all]`` prints the
cache folder.  Needs the host's ``comfy`` package importable (``tools.hostenv.import_host()`` arranges that).
"""
from __future__ import annotations

from pathlib import Path

from . import flux, hunyuan_video, qwen_image, sd3, wan
from .common import SEED, cache_root, content_hash
from .flow import FOLDERS, Family, ModelFile, VaeFile
from .sd import (BASE_TAG, KINDS, LORA_FILES, OUTPUT_GAIN, TINY_UNET_CONFIG, UNET_CONFIGS, VAE_DDCONFIG, _factors,
                 _gen, _meta_state_dict, build_checkpoint, build_lora, checkpoint_name, fill, unet_lora_targets)

# The one list of flow-matching / DiT families (a new family: one module plus one entry here).
FLOW_FAMILIES: dict[str, Family] = {m.FAMILY.key: m.FAMILY for m in (sd3, flux, wan, qwen_image, hunyuan_video)}
ALL_KINDS = (*KINDS, *FLOW_FAMILIES)


def root() -> Path:
    return cache_root() / content_hash()


def ensure(kinds=("sd15",)) -> Path:
    """Make sure the stand-ins for `kinds` exist in the cache; returns the cache folder."""
    from . import flow, sd
    base = root()
    for sub in ("checkpoints", "loras", *FOLDERS):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        if kind in KINDS:
            sd.ensure_kind(kind, base)
        elif kind in FLOW_FAMILIES:
            flow.ensure_family(FLOW_FAMILIES[kind], base)
        else:
            raise ValueError(f"unknown stand-in kind {kind!r}; choose from {ALL_KINDS}")
    return base


def family(key: str) -> Family:
    try:
        return FLOW_FAMILIES[key]
    except KeyError:
        raise ValueError(f"unknown flow family {key!r}; choose from {tuple(FLOW_FAMILIES)}") from None


def diffusion_model_name(key: str, role: str = "model") -> str:
    """File name (in diffusion_models/) of a family's model.  Roles: "model"; for "wan" "t2v" (Wan 2.1 1.3B-style),
    "high_noise" and "low_noise" (the Wan 2.2 A14B experts)."""
    models = family(key).models
    if role not in models:
        raise ValueError(f"{key} has no {role!r} model; roles: {tuple(models)}")
    return models[role].name


def vae_name(key: str) -> str:
    return family(key).vae.name


def lora_files(key: str, base: Path | None = None) -> dict:
    """File name -> (path, LoraFile) of a family's LoRA stand-ins.  The LoraFile says its role ("acceleration" /
    "style"), layout and suffix style (the format), rank, alpha, target model role, the release or trainer it
    mirrors, and the keys core's loader leaves unloaded.  Build them first with ``ensure((key,))``."""
    base = base or root()
    return {lf.name: (base / "loras" / lf.name, lf) for lf in family(key).loras}


__all__ = ["ALL_KINDS", "BASE_TAG", "FLOW_FAMILIES", "KINDS", "LORA_FILES", "OUTPUT_GAIN", "SEED", "TINY_UNET_CONFIG",
           "UNET_CONFIGS", "VAE_DDCONFIG", "Family", "ModelFile", "VaeFile", "_factors", "_gen", "_meta_state_dict",
           "build_checkpoint", "build_lora", "cache_root", "checkpoint_name", "content_hash", "diffusion_model_name",
           "ensure", "family", "fill", "lora_files", "root", "unet_lora_targets", "vae_name"]
