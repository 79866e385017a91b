"""The UNet side of ``lora.detect``: the structure of an SD1.x / SD2.x / SDXL / SSD-1B adapter and the release
names of their acceleration LoRAs.

Structure: UNet-only, full resnet (conv1/conv2) + time-embedding coverage, uniform rank ("acceleration-shaped": the
LCM / TCD / PCM training scripts' LoCon-like full-UNet targets, and LoRAs extracted from distilled UNets); attention
only, or no UNet modules ("style-shaped"); anything else "unclear". Base model from the context width (attn2 k/v
input 768 = SD1.5, 1024 = SD2, 2048 = SDXL; SDXL without mid-block attention and with at most 4 transformer blocks
per level = SSD-1B), ``label_emb``/``add_embedding`` keys (SDXL), else proj_in's layer type (1x1 conv = SD1.5,
linear = SD2).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .adapters import LoraModule
from .formats import Adapter
from .keys import canonical

LCM, TCD, ANIMATELCM, HYPERSD_UNIFIED = "LCM-LoRA", "TCD", "AnimateLCM", "Hyper-SD 1-step unified"
DMD2, FLASH_SDXL, SDXL_TURBO = "DMD2 4-step", "Flash Diffusion SDXL 4-step", "SDXL-Turbo"
PRESET_NAMES = frozenset(
    [LCM, TCD, "PCM LCM-like", ANIMATELCM, HYPERSD_UNIFIED]
    + [f"PCM smallcfg {n}-step" for n in (2, 4, 8, 16)]
    + [f"PCM normalcfg {n}-step" for n in (4, 8, 16)]
    + [f"Hyper-SD {n}-step" for n in (1, 2, 4, 8)]
    + [f"Hyper-SD CFG {n}-step" for n in (8, 12)]
    + [f"SDXL-Lightning {n}-step" for n in (1, 2, 4, 8)]
)
"""The UNet presets ``samplers/presets.py`` has; ``NEW_PRESET_NAMES`` come with the flow-matching presets."""
NEW_PRESET_NAMES = frozenset([DMD2, FLASH_SDXL, SDXL_TURBO])

# SD.Next extensions-builtin/Lora/network_overrides.py short hashes -> (kind, preset, base)
KNOWN_HASHES: dict[str, tuple[str, str | None, str | None]] = {
    "aaebf6360f7d": ("lcm", LCM, "sd15"),
    "3d18b05e4f56": ("lcm", LCM, "sdxl"),
    "b71dcb732467": ("tcd", TCD, "sdxl"),
    "813ea5fb1c67": ("turbo", SDXL_TURBO, "sdxl"),
    "5a48ac366664": ("hypersd", HYPERSD_UNIFIED, "sd15"),
    "ee0ff23dcc42": ("hypersd", "Hyper-SD 2-step", "sd15"),
    "e476eb1da5df": ("hypersd", "Hyper-SD 4-step", "sd15"),
    "ecb844c3f3b0": ("hypersd", "Hyper-SD 8-step", "sd15"),
    "1ab289133ebb": ("hypersd", "Hyper-SD CFG 8-step", "sd15"),
    "4f494295edb1": ("hypersd", "Hyper-SD 8-step", "sdxl"),
    "ca14a8c621f8": ("hypersd", "Hyper-SD CFG 8-step", "sdxl"),
    "1c88f7295856": ("hypersd", "Hyper-SD 4-step", "sdxl"),
    "fdd5dcd1d88a": ("hypersd", "Hyper-SD 2-step", "sdxl"),
    "8cca3706050b": ("hypersd", HYPERSD_UNIFIED, "sdxl"),
    "1c32bdb07a7c": ("lightning", "SDXL-Lightning 4-step", "sdxl"),  # SimpleSDXL models_info.py
    "816d0eed49fd": ("flash", FLASH_SDXL, "sdxl"),
    "c2ec22757b46": ("flash", None, "sd15"),
}


@dataclass
class Shape:
    """An adapter's structure as detection reads it (UNet or DiT).

    verdict: "accel" (shaped like a distillation LoRA), "style" (shaped like a style LoRA: a release-like name does
    not make it one), "unclear" (neither), "none" (no modules this side understands).
    """

    verdict: str
    base: str | None
    base_why: str = ""
    why: list[str] = field(default_factory=list)
    candidates: tuple[str, ...] = ()
    dit: object | None = None  # lora.detect_dit.DitFacts of a DiT adapter


def base_from_text(s: str) -> str | None:
    """The base model a name or header string names (SD families and DiTs), or None."""
    t = s.lower()
    for pat, base in ((r"ssd-?1b", "ssd1b"), (r"sdxl|[-_]xl[-_.]|stable-diffusion-xl", "sdxl"),
                      (r"sd-?v?1[-_.]?5|sd15|sdv1|stable-diffusion-v1", "sd15"),
                      (r"sd-?3|stable-diffusion-v?3", "sd3"), (r"sd-?v?2|sd21|stable-diffusion-v2", "sd2"),
                      (r"flux", "flux"), (r"(?<![a-z])wan[-_ .]?2[._]?2.*?(5b|ti2v)|ti2v[-_ ]?5b", "wan22_5b"),
                      (r"(?<![a-z])wan(?![a-z])|(?<![a-z])wan\d", "wan"),
                      (r"qwen", "qwen_image"), (r"hunyuan[-_ ]?video|hyvideo", "hunyuan_video")):
        if re.search(pat, t):
            return base
    return None


def match_name(name: str, loose: bool = False) -> tuple[str, str | None, int | None, str | None, str] | None:
    """Match a UNet release file name. Returns (kind, preset, steps, base, why) or None.

    ``loose`` also accepts spellings seen in the wild that are too generic to trust without an acceleration-like
    structure (the caller decides)."""
    n = os.path.basename(name).lower()
    base = base_from_text(n)
    if base not in (None, "sd15", "sd2", "sdxl", "ssd1b"):
        return None
    hit = _match_release(n, base)
    if hit is None and loose and "unet" not in n:
        hit = _match_loose(n, base)
    return hit


def _hypersd(steps: int, cfg: bool, b: str | None, why: str):
    if cfg:
        preset = f"Hyper-SD CFG {steps}-step"
        return "hypersd", preset if preset in PRESET_NAMES else None, steps, b, why
    if steps == 1:
        return "hypersd", HYPERSD_UNIFIED, 1, b, why + " (1-step: the unified LoRA)"
    preset = f"Hyper-SD {steps}-step"
    return "hypersd", preset if preset in PRESET_NAMES else None, steps, b, why


def _match_loose(n: str, base: str | None):
    m = re.search(r"hyper[-_ ]?sd[-_ ]?(15|xl)?[-_ ]?(\d+)[-_ ]?steps?([-_ ]?cfg)?", n)
    if m:
        b = {"15": "sd15", "xl": "sdxl"}.get(m.group(1) or "", base)
        return _hypersd(int(m.group(2)), bool(m.group(3)), b, "file name looks like Hyper-SD {N}-step")
    m = re.search(r"lightning[-_ ]?(\d+)[-_ ]?steps?", n)
    if m:
        steps = int(m.group(1))
        preset = f"SDXL-Lightning {steps}-step"
        return ("lightning", preset if preset in PRESET_NAMES else None, steps, base or "sdxl",
                "file name looks like SDXL-Lightning {N}-step")
    if re.search(r"sd15[-_](t2v[-_])?(lora[-_])?beta([-_]lora)?|sd15[-_]t2v[-_]beta[-_]lora", n):
        return "animatelcm", ANIMATELCM, None, "sd15", "file name is AnimateLCM's original sd15_lora_beta"
    folder = re.sub(r"\.safetensors$", "", n)
    if folder in ("lcm", "tcd", "lcm-lora", "lcm_lora", "tcd-lora", "tcd_lora"):
        kind = "tcd" if folder.startswith("tcd") else "lcm"
        return kind, TCD if kind == "tcd" else LCM, None, base, f"folder/file named '{folder}'"
    return None


def _match_release(n: str, base: str | None):
    m = re.search(r"animatelcm", n)
    if m:
        return "animatelcm", ANIMATELCM, None, base or "sd15", "file name matches AnimateLCM*"
    m = re.search(r"pcm[-_](sd15|sdxl)[-_](smallcfg|normalcfg)[-_]?(\d+)[-_]?steps?", n)
    if m:
        b, cfg, steps = m.group(1), m.group(2), int(m.group(3))
        preset = f"PCM {cfg} {steps}-step"
        return ("pcm", preset if preset in PRESET_NAMES else None, steps, b,
                f"file name matches pcm_{{sd15,sdxl}}_{cfg}_{steps}step")
    m = re.search(r"pcm[-_](sd15|sdxl)[-_]lcmlike", n)
    if m:
        return "pcm", "PCM LCM-like", None, m.group(1), "file name matches pcm_*_lcmlike"
    m = re.search(r"hyper-?sd(15|xl)-(\d+)-?steps?-cfg-lora", n)
    if m:
        return _hypersd(int(m.group(2)), True, "sd15" if m.group(1) == "15" else "sdxl",
                        "file name matches Hyper-SD*-{N}steps-CFG-lora")
    m = re.search(r"hyper-?sd(15|xl)-(\d+)-?steps?-lora", n)
    if m:
        return _hypersd(int(m.group(2)), False, "sd15" if m.group(1) == "15" else "sdxl",
                        "file name matches Hyper-SD*-{N}steps-lora")
    m = re.search(r"sdxl[-_]lightning[-_](\d+)[-_]?steps?[-_]lora", n)
    if m:
        steps = int(m.group(1))
        preset = f"SDXL-Lightning {steps}-step"
        return ("lightning", preset if preset in PRESET_NAMES else None, steps, "sdxl",
                "file name matches sdxl_lightning_{N}step_lora")
    if re.search(r"dmd2[-_](sdxl[-_])?4[-_]?step", n):
        return "dmd2", DMD2, 4, base or "sdxl", "file name matches dmd2_sdxl_4step_lora"
    if re.search(r"flash[-_ ]?(diffusion[-_ ]?)?sdxl|flash[-_]sdxl", n):
        return "flash", FLASH_SDXL, 4, "sdxl", "file name matches Flash Diffusion SDXL"
    if re.search(r"(^|[^a-z])tcd([^a-z]|$)", n):
        return "tcd", TCD, None, base, "file name matches TCD-*"
    if re.search(r"lcm[-_ ]?lora|lora[-_ ]?lcm", n):
        return "lcm", LCM, None, base, "file name matches lcm-lora-*"
    return None


@dataclass
class Structure:
    """Structural facts of an adapter (UNet side)."""

    unet_only: bool
    n_modules: int
    ranks: set[int]
    has_time_emb: bool
    resnet_blocks: int
    resnet_conv_blocks: int
    has_down_up_samplers: bool
    context_dim: int | None
    has_label_emb: bool
    max_input_block: int | None
    max_down_block: int | None
    base_model: str | None
    base_why: str
    unet_modules: int = 0


_RESNET_RE = re.compile(r"^(?:(input_blocks|output_blocks)_(\d+)_0|middle_block_[02]|"
                        r"(down_blocks|up_blocks)_(\d+)_resnets_(\d+)|mid_block_resnets_(\d+))_")
_UNET_RE = re.compile(r"^(input_blocks|middle_block|output_blocks|down_blocks|up_blocks|mid_block)_")


def analyse_structure(adapter: Adapter) -> Structure:
    """Collect the structural facts of the UNet side."""
    names = [canonical(e.name) for e in adapter.entries]
    ranks = {e.rank for e in adapter.entries if isinstance(e, LoraModule)}
    has_time = any(re.search(r"(time_emb_proj|emb_layers_1)$", n) for n in names)
    resnets: set[str] = set()
    resnets_conv: set[str] = set()
    for n in names:
        m = _RESNET_RE.match(n)
        if m and not re.search(r"^input_blocks_\d+_0_op$", n):  # LDM downsamplers sit at index 0 too
            blk = m.group(0)
            resnets.add(blk)
            if re.search(r"(conv1|conv2|in_layers_2|out_layers_3)$", n):
                resnets_conv.add(blk)
    samplers = any("samplers_0_conv" in n or re.search(r"input_blocks_\d+_0_op$|output_blocks_\d+_[12]_conv$", n)
                   for n in names)
    ctx: int | None = None
    for e in adapter.entries:
        n = canonical(e.name)
        if isinstance(e, LoraModule) and re.search(r"attn2_to_[kv]$", n):
            ctx = int(e.down.reshape(e.down.shape[0], -1).shape[1])
            break
    label = any(n.startswith(("label_emb", "add_embedding", "class_embedding")) for n in names)
    ins = [int(m.group(1)) for n in names for m in [re.match(r"input_blocks_(\d+)_", n)] if m]
    downs = [int(m.group(1)) for n in names for m in [re.match(r"down_blocks_(\d+)_", n)] if m]
    unet = [n for n in names if _UNET_RE.match(n)]
    base, why = _unet_base(adapter, names, ctx, label, ins, downs)
    return Structure(unet_only=not adapter.text_encoder_keys, n_modules=len(set(names)), ranks=ranks,
                     has_time_emb=has_time, resnet_blocks=len(resnets), resnet_conv_blocks=len(resnets_conv),
                     has_down_up_samplers=samplers, context_dim=ctx, has_label_emb=label,
                     max_input_block=max(ins) if ins else None, max_down_block=max(downs) if downs else None,
                     base_model=base, base_why=why, unet_modules=len(unet))


def _unet_base(adapter: Adapter, names: list[str], ctx, label, ins, downs) -> tuple[str | None, str]:
    if ctx == 2048 or label:
        base, why = "sdxl", ("cross-attention context 2048" if ctx == 2048 else "label_emb/add_embedding keys")
        ssd = _ssd1b_layout(names)
        return ("ssd1b", ssd) if ssd else (base, why)
    if ctx == 768:
        return "sd15", "cross-attention context 768, no label_emb/add_embedding"
    if ctx == 1024:
        return "sd2", "cross-attention context 1024"
    if (ins and max(ins) > 8) or (downs and max(downs) == 3):
        # SD1.x and SD2.x share these blocks; proj_in tells them apart (1x1 conv in SD1.x, linear in SD2.x).
        proj = next((e for e in adapter.entries if isinstance(e, LoraModule)
                     and re.search(r"(attentions_\d+|_\d+_1)_proj_in$", canonical(e.name))), None)
        if proj is not None:
            return (("sd15", "SD1.x block layout, proj_in is a 1x1 conv") if proj.down.ndim == 4
                    else ("sd2", "SD1.x/2.x block layout, proj_in is linear (SD2.x)"))
    return None, ""


def _ssd1b_layout(names: list[str]) -> str:
    """Why an SDXL-width adapter is for SSD-1B (no mid-block attention, at most 4 transformer blocks at the deepest
    level, which SDXL has 10 of), or "" when it is not, or cannot be told."""
    deep = [int(m.group(1)) for n in names for m in
            [re.match(r"(?:input_blocks_[78]_1|down_blocks_2_attentions_\d+)_transformer_blocks_(\d+)_", n)] if m]
    mid_attn = any(re.match(r"(middle_block_1|mid_block_attentions_0)_", n) for n in names)
    if deep and max(deep) == 3 and not mid_attn and any(re.match(r"(output_blocks_\d+_1|up_blocks_\d+_attentions)", n)
                                                         for n in names):
        return "SDXL width, no mid-block attention and 4 transformer blocks at the deepest level (SSD-1B)"
    return ""


def unet_shape(adapter: Adapter) -> Shape:
    """The UNet structure verdict (module doc)."""
    s = analyse_structure(adapter)
    if not s.unet_modules:
        return Shape("none", None)
    why = ["UNet-only (no text encoder keys)" if s.unet_only else "has text encoder keys (typical of style LoRAs)",
           f"resnet conv coverage {s.resnet_conv_blocks} blocks, time-embedding "
           f"{'present' if s.has_time_emb else 'absent'}"]
    uniform = len(s.ranks) == 1
    why.append(f"uniform rank {next(iter(s.ranks))}" if uniform else
               (f"mixed ranks {sorted(s.ranks)}" if s.ranks else "no plain LoRA modules"))
    full = s.resnet_blocks > 0 and s.resnet_conv_blocks == s.resnet_blocks and s.has_time_emb
    if s.unet_only and full and s.resnet_conv_blocks >= 8 and uniform:
        verdict = "accel"
    elif s.resnet_conv_blocks == 0:
        verdict = "style"
        why.append("no resnet coverage: attention layers only (a style LoRA's shape)")
    else:
        verdict = "unclear"
    return Shape(verdict, s.base_model, s.base_why, why)
