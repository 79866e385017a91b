"""Detect which acceleration (few-step distillation) LoRA an adapter file is, and which model family it is for.

Structure outranks names and metadata, on every family. Layered cheapest-first, every finding recorded in
``evidence``:

1. Structure (``lora.detect_unet`` for SD1.x / SD2.x / SDXL / SSD-1B, ``lora.detect_dit`` for the DiTs): the base
   model, and a verdict -- "accel" (shaped like a distillation LoRA), "style" (shaped like a style LoRA), or
   "unclear". Structure alone never names a release.
2. Payload hash: the A1111 "addnet" short hash (sha256 of the tensor payload, first 12 hex) against the SD.Next table
   (``network_overrides.py``) -> confidence "high" (it is that release's file). A ``sshs_model_hash`` in the header
   only counts when the payload hash agrees (a header can claim anything); the payload is hashed when the header
   claims a known hash, when ``compute_hash`` asks, and for an unnamed acceleration-shaped file.
3. Release name: the file name (and up to three parent folders for a generic name: ``pytorch_lora_weights``,
   ``diffusion_pytorch_model``, Wan 2.2's ``high_noise_model``; ComfyUI-Manager's ``loras/SD1.5/lcm/``, the HF
   cache's ``models--org--repo/snapshots/<sha>/``), then the header titles (``modelspec.title``,
   ``ss_output_name``): confidence "high" with an acceleration-shaped structure, "medium" with an unclear one, and
   NO preset with a style-shaped one (a style LoRA named after a release, or trained on top of one: reported
   unknown, the name noted). Looser spellings seen in the wild (Fooocus' ``sdxl_hyper_sd_4step_lora``, AnimateLCM's
   ``sd15_lora_beta``, a bare ``lcm``/``tcd`` folder) count only with an acceleration-shaped structure.
4. Nothing named it: an acceleration-shaped file is reported as such ("low": kind unknown, pick the preset by
   hand); anything else is not an acceleration LoRA.

A name or header that names another base model than the tensors is a CONFLICT: the tensors win, confidence "low".
A Wan 2.2 two-expert release also says which expert (high / low noise) it is for (``expert``).

Preset names are ``Preset.name`` of ``samplers/presets.py`` (what the preset widgets store).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from dataclasses import dataclass, field

from .detect_dit import (DIT_FAMILIES, dit_shape, expert_in, match_release, preset_names, release_preset,
                         release_problems)
from .detect_unet import (KNOWN_HASHES, NEW_PRESET_NAMES, Shape, analyse_structure, base_from_text, match_name,
                          unet_shape)
from .detect_unet import PRESET_NAMES as UNET_PRESET_NAMES
from .families import FAMILIES
from .formats import Adapter, read_adapter
from .layouts import BlockLayout

LOG = logging.getLogger("fewstep")

FLOW_PRESET_NAMES = preset_names() | NEW_PRESET_NAMES
"""The presets detection reports that come with the flow-matching presets (DiT releases, DMD2, Flash, Turbo)."""
PRESET_NAMES = UNET_PRESET_NAMES | FLOW_PRESET_NAMES
GENERIC_NAMES = ("pytorch_lora_weights", "diffusion_pytorch_model", "high_noise_model", "low_noise_model",
                 "adapter_model", "lora", "model")

__all__ = ["Detection", "FLOW_PRESET_NAMES", "KNOWN_HASHES", "PRESET_NAMES", "addnet_hash", "analyse_structure",
           "detect", "match_name"]


@dataclass
class Detection:
    """Detector verdict.

    kind: release kind ("lcm", "tcd", "pcm", "hypersd", "lightning", "animatelcm", "turbo", "flash", "dmd2",
        "lightx2v", "causvid", "wan22-lightning", "qwen-image-lightning", "hyper-flux", "flux-turbo-alpha",
        "hyper-sd3", "pcm-sd3", "fastvideo") or "unknown".
    preset_name: sampler preset name (``Preset.name``) or None.
    base_model: a family name (``lora.families``) or None.
    steps: distilled step count or None (variable / unknown).
    confidence: "high", "medium", "low" or "none" (what each rests on: module doc).
    evidence: human-readable reasons, in the order they were found.
    accel_like_structure: the structure looks like a distillation LoRA.
    structure: the structure verdict ("accel", "style", "unclear", "none").
    expert: "high" / "low" for a Wan 2.2 two-expert release, else "".
    candidates: families the module names fit when they do not tell one (e.g. Flux and HunyuanVideo).
    """

    kind: str
    preset_name: str | None
    base_model: str | None
    steps: int | None
    confidence: str
    evidence: list[str] = field(default_factory=list)
    accel_like_structure: bool = False
    structure: str = "none"
    expert: str = ""
    candidates: tuple[str, ...] = ()


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


def _metadata_base(meta: dict, ev: list[str]) -> str | None:
    """The base model the header names (``modelspec.architecture``, ``ss_base_model_version``, ``ss_v2``), noted in
    ``ev``."""
    meta_base = None
    arch = meta.get("modelspec.architecture", "") or meta.get("ss_base_model_version", "")
    if arch:
        meta_base = base_from_text(arch) or ("sd15" if arch.startswith("sd_v1") else None)
        if meta_base:
            ev.append(f"metadata: base {meta_base} ({arch})")
    if meta.get("ss_v2") == "True" and not meta_base:
        meta_base = "sd2"
        ev.append("metadata: ss_v2=True (SD2)")
    return meta_base


def _shape(adapter: Adapter, blocks: BlockLayout | None) -> Shape:
    """The structure verdict from the side (UNet or DiT) whose module names the adapter has."""
    u = unet_shape(adapter)
    return u if u.verdict != "none" else dit_shape(adapter, blocks)


def _name_candidates(adapter: Adapter, ev: list[str]) -> tuple[list[tuple[str, str]], str | None]:
    """(where, text) to match release names in, and a base model the folders name."""
    meta = adapter.metadata or {}
    candidates = [("file name", adapter.path)]
    stem = re.sub(r"\.safetensors$", "", os.path.basename(adapter.path).lower())
    folder_base = None
    if stem.startswith(GENERIC_NAMES):
        ancestors = _ancestor_names(adapter.path)
        candidates += [("folder name", a) for a in ancestors]
        folder_base = next((b for b in map(base_from_text, ancestors) if b), None)
        ev.append(f"generic file name {stem} (releases ship under it): its folders are read too")
    for k in ("modelspec.title", "ss_output_name"):
        if meta.get(k):
            candidates.append((f"metadata {k}", meta[k]))
    return candidates, folder_base


def _match(text: str, s: Shape, loose: bool):
    """(kind, preset, steps, base, why, expert, DiT release or None) of a release ``text`` names, or None (UNet
    names, then the DiT families' releases, the structure's family first)."""
    if s.base is None or s.base not in {f.name for f in DIT_FAMILIES}:
        hit = match_name(text, loose=loose)
        if hit:
            return (*hit, "", None)
    name = os.path.basename(text)
    own = tuple(f for f in DIT_FAMILIES if f.name == s.base)
    hit = (match_release(name, own) if own else None) or match_release(name, DIT_FAMILIES)
    if hit is None:
        return None
    f, r, steps, expert = hit
    return r.kind, release_preset(r, steps), steps, f.name, f"name matches {r.label}", expert, r


def _payload_hash(adapter: Adapter, meta: dict, compute: bool, ev: list[str]) -> str | None:
    """The payload short hash when the header claims a known one (to check the claim) or ``compute`` asks, else
    None; a header claim the payload does not back is noted and ignored."""
    claimed = (meta.get("sshs_model_hash") or "").lower()[:12] or None
    if claimed:
        ev.append(f"metadata sshs_model_hash {claimed}")
    if not compute and claimed not in KNOWN_HASHES:
        return None
    short = addnet_hash(adapter.path)[:12]
    ev.append(f"payload hash {short}")
    if claimed in KNOWN_HASHES and short != claimed:
        ev.append(f"the header claims {claimed} ({KNOWN_HASHES[claimed][0]}, a known release) but the payload hash "
                  f"is {short}: the claim is ignored (only the tensors count)")
    return short


def detect(source: Adapter | str | os.PathLike, *, compute_hash: bool = False,
           blocks: BlockLayout | None = None) -> Detection:
    """Detect the acceleration-LoRA kind and base model of an adapter (or a ``.safetensors`` path).

    Args:
        source: a parsed ``Adapter`` or a path (read with ``read_adapter``).
        compute_hash: always hash the tensor payload (reads the whole file) for the known-hash table.
        blocks: the loaded model's block layout, bound to its depth (a DiT LoRA covering every block of it).
    """
    adapter = source if isinstance(source, Adapter) else read_adapter(source)
    ev: list[str] = []
    meta = adapter.metadata or {}
    s = _shape(adapter, blocks)
    accel = s.verdict == "accel"
    if s.base:
        ev.append(f"structure: base {s.base} ({s.base_why})")
    elif s.candidates:
        ev.append(f"structure: the module names fit {' / '.join(s.candidates)} (they share a naming scheme)")
    meta_base = _metadata_base(meta, ev)

    def finish(kind, preset, steps, base, conf, expert="") -> Detection:
        b = s.base or base or meta_base
        if s.base and base and base != s.base and not (base == "sd15" and s.base == "sd2"):
            ev.append(f"CONFLICT: name/metadata say {base} but the tensors are {s.base}; trusting the tensors")
            conf = "low"
        return Detection(kind, preset, b, steps, conf, ev, accel, s.verdict, expert, s.candidates)

    short = _payload_hash(adapter, meta, compute_hash, ev)
    if short in KNOWN_HASHES:
        return _known(short, ev, finish)
    candidates, folder_base = _name_candidates(adapter, ev)
    for where, text in candidates:
        hit = _match(text, s, loose=accel)
        if hit:
            kind, preset, steps, base, reason, expert, release = hit
            ev.append(f"{where}: {reason}")
            ev.extend(f"structure: {w}" for w in s.why)
            problems = (release_problems(release, s.dit) if release is not None and s.dit is not None
                        else ["the structure is a style LoRA's"] if s.verdict == "style" else [])
            if problems:
                ev.append(f"but {'; '.join(problems)}: not treated as an acceleration LoRA (a style LoRA named after "
                          f"one, or trained on top of one); pick the preset by hand if it really is one")
                return Detection("unknown", None, s.base or base or meta_base, None, "low", ev, False, s.verdict,
                                 "", s.candidates)
            fits = accel or (release is not None and s.dit is not None)
            if release is not None and s.dit is not None:
                ev.append(f"the structure is {release.label}'s (its targets in every block, its rank)")
            elif not accel:
                ev.append("the structure does not show a distillation LoRA's coverage; relying on the name")
            if preset is None:
                ev.append(f"no sampler preset for {kind}" + (f" with {steps} steps" if steps else ""))
            if release is not None and release.experts and not expert:  # e.g. the folder names the release
                expert = next((e for _, t in candidates if (e := expert_in(os.path.basename(t)))), "")
            return finish(kind, preset, steps, base or folder_base, "high" if fits else "medium", expert)
    if accel and short is None:
        short = addnet_hash(adapter.path)[:12]
        ev.append(f"no release name; payload hash {short}")
        if short in KNOWN_HASHES:
            return _known(short, ev, finish)
    ev.extend(f"structure: {w}" for w in s.why)
    if accel:
        ev.append("the structure is a distillation (acceleration) LoRA's, but structure alone cannot tell the release "
                  "apart: kind unknown, pick the preset by hand")
        return Detection("unknown", None, s.base or meta_base, None, "low", ev, True, s.verdict, "", s.candidates)
    ev.append("no known release name or hash: not recognised as an acceleration LoRA")
    return Detection("unknown", None, s.base or meta_base, None, "none" if not s.base else "low", ev, False,
                     s.verdict, "", s.candidates)


def _known(short: str, ev: list[str], finish) -> Detection:
    kind, preset, base = KNOWN_HASHES[short]
    ev.append(f"payload hash {short} is a known release ({kind}, SD.Next table)")
    m = re.search(r"(\d+)-step", preset or "")
    return finish(kind, preset, int(m.group(1)) if m else None, base, "high")


def family_label(name: str | None) -> str:
    """The label of family ``name`` for messages ("SDXL", "Flux"), or "unknown"."""
    f = FAMILIES.get(name or "")
    return f.label if f else (name or "unknown")
