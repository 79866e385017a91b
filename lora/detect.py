"""Detect which acceleration (few-step distillation) LoRA an adapter file is.

One algorithm, layered cheapest-first, every finding recorded in ``evidence``:

1. Optional A1111 "addnet" short hash (sha256 of the tensor payload, first 12
   hex; or ``sshs_model_hash`` metadata) against the SD.Next table
   (``network_overrides.py``) -> confidence "high".
2. File name (and up to three parent folders for the generic
   ``pytorch_lora_weights``: ComfyUI-Manager's ``loras/SD1.5/lcm/``, the HF
   cache's ``models--org--repo/snapshots/<sha>/``), then metadata titles
   (``modelspec.title``, ``ss_output_name``) against the release name patterns
   -> "medium"; "high" when the structure agrees. Looser spellings seen in the
   wild (Fooocus' ``sdxl_hyper_sd_4step_lora``, AnimateLCM's original
   ``sd15_lora_beta``, a bare ``lcm``/``tcd`` folder) count only when the
   structure looks like an acceleration LoRA. A name never wins over a clear
   style structure (text-encoder keys and no resnet coverage, or no UNet
   modules): such a file is reported unknown, with the name noted.
   When nothing matched and the structure looks like an acceleration LoRA, the
   payload hash is checked against the table (one more read of the file).
3. Structure: UNet-only, full resnet (conv1/conv2) + time-embedding coverage,
   uniform rank, base model from context width (attn2 k/v input 768 = SD1.5,
   1024 = SD2, 2048 = SDXL; SDXL without mid-block attention and with at most
   4 transformer blocks per level = SSD-1B), ``label_emb``/``add_embedding``
   keys (SDXL), else proj_in's layer type (1x1 conv = SD1.5, linear = SD2).
   Structure alone never names a kind: it returns kind "unknown", confidence
   "low", and says why.

Preset names are ``Preset.name`` of ``samplers/presets.py`` (what the preset
widgets store): LCM-LoRA, TCD, PCM {smallcfg,normalcfg} N-step, PCM LCM-like,
Hyper-SD N-step, Hyper-SD CFG N-step, Hyper-SD 1-step unified,
SDXL-Lightning N-step, AnimateLCM.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from dataclasses import dataclass, field

from .adapters import LoraModule
from .formats import Adapter, read_adapter
from .keys import canonical

LOG = logging.getLogger("fewstep")

LCM, TCD, ANIMATELCM, HYPERSD_UNIFIED = "LCM-LoRA", "TCD", "AnimateLCM", "Hyper-SD 1-step unified"
PRESET_NAMES = frozenset(
    [LCM, TCD, "PCM LCM-like", ANIMATELCM, HYPERSD_UNIFIED]
    + [f"PCM smallcfg {n}-step" for n in (2, 4, 8, 16)]
    + [f"PCM normalcfg {n}-step" for n in (4, 8, 16)]
    + [f"Hyper-SD {n}-step" for n in (1, 2, 4, 8)]
    + [f"Hyper-SD CFG {n}-step" for n in (8, 12)]
    + [f"SDXL-Lightning {n}-step" for n in (1, 2, 4, 8)]
)

# SD.Next extensions-builtin/Lora/network_overrides.py short hashes -> (kind, preset, base)
KNOWN_HASHES: dict[str, tuple[str, str | None, str | None]] = {
    "aaebf6360f7d": ("lcm", LCM, "sd15"),
    "3d18b05e4f56": ("lcm", LCM, "sdxl"),
    "b71dcb732467": ("tcd", TCD, "sdxl"),
    "813ea5fb1c67": ("turbo", None, "sdxl"),
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
    "816d0eed49fd": ("flash", None, "sdxl"),
    "c2ec22757b46": ("flash", None, "sd15"),
}


@dataclass
class Detection:
    """Detector verdict.

    kind: "lcm", "tcd", "pcm", "hypersd", "lightning", "animatelcm", "turbo", "flash" or "unknown".
    preset_name: sampler preset name (``PRESET_NAMES``) or None.
    base_model: "sd15", "sd2", "sdxl", "ssd1b" or None.
    steps: distilled step count or None (variable / unknown).
    confidence: "high", "medium", "low" or "none".
    evidence: human-readable reasons, in the order they were found.
    accel_like_structure: structure looks like a full-UNet distillation LoRA.
    """

    kind: str
    preset_name: str | None
    base_model: str | None
    steps: int | None
    confidence: str
    evidence: list[str] = field(default_factory=list)
    accel_like_structure: bool = False


def _base_from_text(s: str) -> str | None:
    t = s.lower()
    if re.search(r"ssd-?1b", t):
        return "ssd1b"
    if re.search(r"sdxl|[-_]xl[-_.]|stable-diffusion-xl", t):
        return "sdxl"
    if re.search(r"sd-?v?1[-_.]?5|sd15|sdv1|stable-diffusion-v1", t):
        return "sd15"
    if re.search(r"sd-?v?2|sd21|stable-diffusion-v2", t):
        return "sd2"
    return None


def match_name(name: str, loose: bool = False) -> tuple[str, str | None, int | None, str | None, str] | None:
    """Match a release file name. Returns (kind, preset, steps, base, why) or None.

    ``loose`` also accepts spellings seen in the wild that are too generic to trust without an acceleration-like
    structure (the caller decides)."""
    n = os.path.basename(name).lower()
    base = _base_from_text(n)
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
    if re.search(r"(^|[^a-z])tcd([^a-z]|$)", n):
        return "tcd", TCD, None, base, "file name matches TCD-*"
    if re.search(r"lcm[-_ ]?lora|lora[-_ ]?lcm", n):
        return "lcm", LCM, None, base, "file name matches lcm-lora-*"
    return None


def addnet_hash(path: str) -> str:
    """A1111/kohya "addnet" hash: sha256 of the safetensors payload after the JSON header (full hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
        n = struct.unpack("<Q", head)[0]
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


_RESNET_RE = re.compile(r"^(?:(input_blocks|output_blocks)_(\d+)_0|middle_block_[02]|"
                        r"(down_blocks|up_blocks)_(\d+)_resnets_(\d+)|mid_block_resnets_(\d+))_")


def analyse_structure(adapter: Adapter) -> Structure:
    """Collect the structural facts used by ``detect``."""
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
    base, why = None, ""
    if ctx == 2048 or label:
        base, why = "sdxl", ("cross-attention context 2048" if ctx == 2048 else "label_emb/add_embedding keys")
        ssd = _ssd1b_layout(names)
        if ssd:
            base, why = "ssd1b", ssd
    elif ctx == 768:
        base, why = "sd15", "cross-attention context 768, no label_emb/add_embedding"
    elif ctx == 1024:
        base, why = "sd2", "cross-attention context 1024"
    elif (ins and max(ins) > 8) or (downs and max(downs) == 3):
        # SD1.x and SD2.x share these blocks; proj_in tells them apart (1x1 conv in SD1.x, linear in SD2.x).
        proj = next((e for e in adapter.entries if isinstance(e, LoraModule)
                     and re.search(r"(attentions_\d+|_\d+_1)_proj_in$", canonical(e.name))), None)
        if proj is not None:
            base, why = (("sd15", "SD1.x block layout, proj_in is a 1x1 conv") if proj.down.ndim == 4
                         else ("sd2", "SD1.x/2.x block layout, proj_in is linear (SD2.x)"))
    return Structure(unet_only=not adapter.text_encoder_keys, n_modules=len(set(names)), ranks=ranks,
                     has_time_emb=has_time, resnet_blocks=len(resnets), resnet_conv_blocks=len(resnets_conv),
                     has_down_up_samplers=samplers, context_dim=ctx, has_label_emb=label,
                     max_input_block=max(ins) if ins else None, max_down_block=max(downs) if downs else None,
                     base_model=base, base_why=why)


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


def _style_like(s: Structure, adapter: Adapter) -> str:
    """Why the tensors say "style LoRA" clearly enough to overrule a release-like name, or ""."""
    if not adapter.modules():
        return "it has no UNet LoRA modules"
    if not s.unet_only and s.resnet_conv_blocks == 0:
        return "it has text-encoder keys and no resnet coverage (a style LoRA's shape)"
    return ""


def _ancestor_names(path: str, levels: int = 3) -> list[str]:
    """Parent folder names, nearest first; the HF cache's ``models--org--repo`` becomes ``org/repo``."""
    out, d = [], os.path.dirname(os.path.abspath(path))
    for _ in range(levels):
        name = os.path.basename(d)
        if not name:
            break
        out.append(name.replace("models--", "", 1).replace("--", "/") if name.startswith("models--") else name)
        d = os.path.dirname(d)
    return out


def _accel_like(s: Structure) -> tuple[bool, list[str]]:
    why: list[str] = []
    ok = True
    why.append("UNet-only (no text encoder keys)" if s.unet_only else "has text encoder keys (typical of style LoRAs)")
    ok &= s.unet_only
    full_res = s.resnet_blocks > 0 and s.resnet_conv_blocks == s.resnet_blocks and s.has_time_emb
    why.append(f"resnet conv coverage {s.resnet_conv_blocks} blocks, time-embedding "
               f"{'present' if s.has_time_emb else 'absent'}")
    ok &= full_res and s.resnet_conv_blocks >= 8
    if len(s.ranks) == 1:
        why.append(f"uniform rank {next(iter(s.ranks))}")
    else:
        why.append(f"mixed ranks {sorted(s.ranks)}" if s.ranks else "no plain LoRA modules")
        ok = False
    return ok, why


def _metadata_base(meta: dict, ev: list[str]) -> str | None:
    """The base model the header names (``modelspec.architecture``, ``ss_base_model_version``, ``ss_v2``), noted in
    ``ev``."""
    meta_base = None
    arch = meta.get("modelspec.architecture", "") or meta.get("ss_base_model_version", "")
    if arch:
        meta_base = _base_from_text(arch) or ("sd15" if arch.startswith("sd_v1") else None)
        if meta_base:
            ev.append(f"metadata: base {meta_base} ({arch})")
    if meta.get("ss_v2") == "True" and not meta_base:
        meta_base = "sd2"
        ev.append("metadata: ss_v2=True (SD2)")
    return meta_base


def _short_hash(adapter: Adapter, meta: dict, compute_hash: bool, ev: list[str]) -> str | None:
    """The addnet short hash from the header (``sshs_model_hash``), or of the payload with ``compute_hash``."""
    short = None
    hs = meta.get("sshs_model_hash")
    if hs:
        short = hs.lower()[:12]
        ev.append(f"metadata sshs_model_hash {short}")
    if compute_hash and short not in KNOWN_HASHES:
        short = addnet_hash(adapter.path)[:12]
        ev.append(f"payload hash {short}")
    return short


def detect(source: Adapter | str | os.PathLike, *, compute_hash: bool = False) -> Detection:
    """Detect the acceleration-LoRA kind of an adapter (or a ``.safetensors`` path).

    Args:
        source: a parsed ``Adapter`` or a path (read with ``read_adapter``).
        compute_hash: also hash the tensor payload (reads the whole file) for the known-hash table.
    """
    adapter = source if isinstance(source, Adapter) else read_adapter(source)
    ev: list[str] = []
    meta = adapter.metadata or {}
    s = analyse_structure(adapter)
    accel_like, why = _accel_like(s)
    if s.base_model:
        ev.append(f"structure: base {s.base_model} ({s.base_why})")
    meta_base = _metadata_base(meta, ev)

    def finish(kind, preset, steps, base, conf) -> Detection:
        b = s.base_model or base or meta_base
        if s.base_model and base and base != s.base_model and not (base == "sd15" and s.base_model == "sd2"):
            ev.append(f"CONFLICT: name/metadata say {base} but the tensors are {s.base_model}; trusting the tensors")
            conf = "low"
        return Detection(kind, preset, b, steps, conf, ev, accel_like)

    short = _short_hash(adapter, meta, compute_hash, ev)
    def known(short: str) -> Detection:
        kind, preset, base = KNOWN_HASHES[short]
        ev.append(f"hash {short} is a known release ({kind}, SD.Next table)")
        m = re.search(r"(\d+)-step", preset or "")
        return finish(kind, preset, int(m.group(1)) if m else None, base, "high")

    if short in KNOWN_HASHES:
        return known(short)

    candidates = [("file name", adapter.path)]
    base_name = os.path.basename(adapter.path).lower()
    folder_base = None
    if base_name.startswith("pytorch_lora_weights"):
        ancestors = _ancestor_names(adapter.path)
        candidates += [("folder name", a) for a in ancestors]
        folder_base = next((b for b in map(_base_from_text, ancestors) if b), None)
        ev.append("generic diffusers file name pytorch_lora_weights (used by LCM-LoRA and TCD releases)")
    for k in ("modelspec.title", "ss_output_name"):
        if meta.get(k):
            candidates.append((f"metadata {k}", meta[k]))
    style = _style_like(s, adapter)
    for where, text in candidates:
        hit = match_name(text, loose=accel_like)
        if hit:
            kind, preset, steps, base, reason = hit
            ev.append(f"{where}: {reason}")
            ev.extend(f"structure: {w}" for w in why)
            if style:
                ev.append(f"but {style}: not treated as an acceleration LoRA (a style LoRA named after one, or "
                          f"made on top of one); pick the preset by hand if it really is one")
                return Detection("unknown", None, s.base_model or base or meta_base, None, "low", ev, False)
            conf = "high" if accel_like else "medium"
            if not accel_like:
                ev.append("structure does not look like a full-UNet distillation LoRA; relying on the name")
            if preset is None:
                ev.append(f"no sampler preset for {kind} with {steps} steps")
            return finish(kind, preset, steps, base or folder_base, conf)

    if accel_like and not compute_hash and short is None:
        short = addnet_hash(adapter.path)[:12]
        ev.append(f"no release name; payload hash {short}")
        if short in KNOWN_HASHES:
            return known(short)

    ev.extend(f"structure: {w}" for w in why)
    if accel_like:
        ev.append("structure looks like a distillation (acceleration) LoRA, but structure alone cannot tell "
                  "LCM/TCD/PCM/Hyper-SD/Lightning apart: kind unknown, pick the preset by hand")
        return Detection("unknown", None, s.base_model or meta_base, None, "low", ev, True)
    ev.append("no known release name, hash or metadata: not recognised as an acceleration LoRA")
    return Detection("unknown", None, s.base_model or meta_base, None, "none" if not s.base_model else "low", ev,
                     False)
