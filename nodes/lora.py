"""LoRA nodes: fuse an acceleration LoRA + style LoRAs exactly, save the fused model, export the merged delta.

* FewStep LoRA Fuse -> a MODEL clone with one lazy ``FusedDelta`` patch per touched weight: when the host patches
  the weight it computes that weight's whole delta (all adapters, one fp32 GEMM for plain LoRAs), adds it to the fp32
  weight and rounds once; unpatching restores the backed-up weights bit for bit. Only the LoRA factors are held,
  so the extra memory while patching is one layer's delta. Plus a report (matched/unmatched keys, text-encoder keys
  ignored, detected base model and acceleration kind/preset).
* FewStep Save Fused -> a ``.safetensors`` checkpoint with the fuse settings in its metadata.
* FewStep Export LoRA -> the merged delta as a kohya LoRA by randomized SVD (rank or energy), with a report of the
  per-key relative Frobenius error.

All math lives in ``lora/`` (no comfy imports there); this module passes host facts in (the UNet key map, the
diffusers->LDM map, weight shapes, base weights) and turns ``ValueError`` into one naming the node.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Iterator, Optional

import torch
from comfy.weight_adapter.base import WeightAdapterBase
from comfy_api.v0_0_2 import io

from ..lora import formats, keys, merge  # detect and export are imported where used (start-up time)
from ..lora.fuse import check_key_shapes
from ..samplers import presets
from .sampling import checked, model_base

LOG = logging.getLogger("fewstep")

NONE = "none"
FUSE_KEY = "fewstep_fuse"  # model_options key: list of fuse records (one per FewStep LoRA Fuse in the chain)
N_STYLES = 3
MOST_UNMATCHED = 0.5  # more than this fraction of an adapter's modules unmatched -> always an error

FUSE = "FewStep LoRA Fuse"
STACK = "FewStep LoRA Stack"
LoraStack = io.Custom("FEWSTEP_LORA_STACK")  # a tuple of (lora file name, strength) pairs, in stacking order
SAVE = "FewStep Save Fused"
EXPORT = "FewStep Export LoRA"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------- lazy patch

class FusedDelta(WeightAdapterBase):
    """A host weight patch that computes its weight's merged fp32 delta only when the host patches the weight."""

    name = "fewstep_fused"

    def __init__(self, node: str, compute):
        self.node, self.compute = node, compute
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        probe = weight.new_zeros(())
        try:
            if (strength == 1.0 and function(probe) is probe and weight.dtype == torch.float32
                    and weight.is_contiguous()):
                # The usual case: the host hands us its fp32 working copy; accumulate straight into it.
                self.compute(device=weight.device, out=weight)
                return weight
            delta = self.compute(device=weight.device)
        except ValueError as e:
            raise ValueError(f"{self.node}: {e}") from None
        except RuntimeError as e:
            if isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
                raise  # the host's memory handling deals with it
            raise ValueError(f"{self.node}: computing the fused delta of '{key}' failed: {e}") from None
        if delta is not None and strength != 0.0:
            weight += function((strength * delta).to(weight.dtype))
        return weight


# ---------------------------------------------------------------- host facts

def lora_options() -> list[str]:
    import folder_paths
    return [NONE] + list(folder_paths.get_filename_list("loras"))


def resolve_lora(node: str, name: str) -> str:
    import folder_paths
    try:
        return folder_paths.get_full_path_or_raise("loras", name)
    except FileNotFoundError:
        raise ValueError(f"{node}: LoRA file {name!r} is not in the loras folder(s)") from None


class HostFacts:
    """What lora/ needs from the host model: key mapper, weight shapes, base weights, architecture."""

    def __init__(self, node: str, model):
        import comfy.lora
        import comfy.utils
        base = model.model
        self.model = model
        self.base = model_base(model)
        if self.base == "unknown":
            raise ValueError(f"{node}: the model is not an SD1.x/SD2.x/SDXL UNet; LoRA fusing supports those only")
        self.arch = merge.normalize_arch(self.base)
        key_map = comfy.lora.model_lora_keys_unet(base, {})
        d2l = comfy.utils.unet_to_diffusers(base.model_config.unet_config)
        self.mapper = keys.KeyMapper(key_map, d2l)
        self.sd = base.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in self.sd.items() if k.startswith("diffusion_model.")}

    def base_weight(self, key: str) -> torch.Tensor:
        """Unpatched weight: the shared backup when some clone currently has the model patched."""
        bk = self.model.backup.get(key)
        w = bk.weight if bk is not None else self.sd[key]
        return w.float()


# ---------------------------------------------------------------- reading + checking adapters

class Loaded:
    def __init__(self, role: str, name: str, path: str, strength: float, adapter, matched, unmatched, det):
        self.role, self.name, self.path, self.strength = role, name, path, strength
        self.adapter, self.matched, self.unmatched, self.det = adapter, matched, unmatched, det
        self.block_weights = ""  # this LoRA's own block weights (from a Stack entry); "" = the fuse node's

    def block_weights_or(self, default: str) -> str:
        return self.block_weights if self.block_weights.strip() else default

    def pairs(self):
        return [(e, self.strength) for e in self.adapter.entries if e.name in self.matched]


def preset_display(det) -> str:
    if det is None or not det.preset_name:
        return NONE
    try:
        return presets.get_preset(det.preset_name).name
    except ValueError:
        return NONE


def load_adapter(node: str, facts: HostFacts, role: str, name: str, strength: float, on_unmatched: str,
                 clip_given: bool = False) -> Loaded:
    path = resolve_lora(node, name)
    adapter = checked(node, formats.read_adapter, path)
    modules = adapter.modules()
    if not modules and not (clip_given and adapter.text_encoder_keys):
        hint = "; it only has text-encoder modules: connect a clip to apply them" if adapter.text_encoder_keys else ""
        raise ValueError(f"{node}: {path}: no UNet LoRA modules found ({adapter.summary()}){hint}")
    used = sum(len(e.source_keys) for e in adapter.entries)
    unknown = adapter.unknown_keys
    if len(unknown) > MOST_UNMATCHED * (len(unknown) + used):
        raise ValueError(f"{node}: {path}: {len(unknown)} of its {len(unknown) + used} UNet tensors are of no known "
                         f"adapter type (e.g. '{unknown[0]}'); fusing the rest would be a partial result. Supported: "
                         f"LoRA/LoCon, LoHa, LoKr, GLoRA, OFT/BOFT, IA3, DoRA, full diffs")
    from ..lora import detect as lora_detect
    det = checked(node, lora_detect.detect, adapter)
    if det.base_model and det.base_model != facts.base:
        raise ValueError(f"{node}: {path} was made for {det.base_model.upper()} but the model is "
                         f"{facts.base.upper()} ({'; '.join(det.evidence[:1])}). Use a LoRA for {facts.base.upper()}.")
    matched, unmatched = facts.mapper.match(modules)
    if len(unmatched) > MOST_UNMATCHED * len(modules):
        checked(node, keys.require_all_matched, path, unmatched)
    if unmatched:
        if on_unmatched == "error":
            checked(node, keys.require_all_matched, path, unmatched)
        LOG.warning("%s: %s: %d of %d UNet modules match no model weight and are skipped, first: %s",
                    node, path, len(unmatched), len(modules), unmatched[:5])
    return Loaded(role, name, path, strength, adapter, matched, unmatched, det)


def report_lines(a: Loaded, clip_given: bool = False) -> list[str]:
    det = a.det
    n_mod = len(a.adapter.modules())
    lines = [f"[{a.role}] {a.name} (strength {a.strength:g}"
             + (f", own block weights '{a.block_weights}'" if a.block_weights.strip() else "") + ")",
             f"  format: {a.adapter.summary()}",
             f"  UNet modules matched {len(a.matched)}/{n_mod}, unmatched {len(a.unmatched)}"
             + (f" (skipped: {', '.join(a.unmatched[:5])}{' ...' if len(a.unmatched) > 5 else ''})"
                if a.unmatched else ""),
             f"  text-encoder keys: {len(a.adapter.text_encoder_keys)}"
             + (" (connect clip to apply them)" if a.adapter.text_encoder_keys and not clip_given else ""),
             f"  unrecognised tensor names left unused: {len(a.adapter.unknown_keys)}",
             *([f"  bundled embeddings: {len(a.adapter.embedding_keys)} tensors, not applied (load them as "
                f"textual-inversion embeddings)"] if a.adapter.embedding_keys else []),
             f"  base model: {det.base_model.upper() if det.base_model else 'unknown'}"]
    if det.kind == "unknown":
        lines.append(f"  detected: unknown -- not a recognised acceleration LoRA (confidence {det.confidence})")
    else:
        lines.append(f"  detected: {det.kind} -> preset {preset_display(det)} (confidence {det.confidence})")
    lines += [f"    - {e}" for e in det.evidence]
    return lines


# ---------------------------------------------------------------- text-encoder parts (optional CLIP)

def te_modules(adapter) -> int:
    return len({formats.split_key(k)[0] for k in adapter.text_encoder_keys})


def apply_text_encoder(node: str, clip, loaded: list[Loaded], base_weight):
    """The adapters' text-encoder modules patched onto a clone of ``clip``, each at its adapter's strength (style
    adapters times ``base_weight(adapter)``, their BASE block weight: LoRA-Block-Weight's text-encoder slot), through
    the host's own CLIP key
    map and LoRA loader (text encoders are small and core maps their keys correctly). Returns (clip, lines)."""
    import comfy.lora
    import comfy.lora_convert
    from safetensors import safe_open
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    c = clip.clone()
    lines = []
    for a in loaded:
        te = a.adapter.text_encoder_keys
        if not te:
            continue
        strength = a.strength * (base_weight(a) if a.role == "style" else 1.0)
        try:
            with safe_open(a.path, framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in te}
        except Exception as e:  # noqa: BLE001 -- file changed or damaged since it was parsed
            raise ValueError(f"{node}: {a.path}: cannot read its text-encoder tensors ({e})") from None
        for k, t in sd.items():
            checked(node, formats.check_finite, a.path, k, t)
        sd = formats.te_state_dict(sd, a.adapter.metadata, a.path)
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), key_map, log_missing=False)
        added = c.add_patches(patches, strength) if strength != 0 else []
        n_mod = te_modules(a.adapter)
        if strength != 0 and len(added) < n_mod:
            msg = (f"{a.path}: only {len(added)} of its {n_mod} text-encoder modules match this CLIP's weights "
                   f"(wrong base model, or a text-encoder key format the host does not know)")
            if len(added) <= MOST_UNMATCHED * n_mod:
                raise ValueError(f"{node}: {msg}")
            LOG.warning("%s: %s", node, msg)
        lines.append(f"[{a.role}] {a.name}: text encoder {len(added)}/{n_mod} modules applied to CLIP "
                     f"(strength {strength:g})")
    return c, lines


# ---------------------------------------------------------------- deltas from a fuse record

def style_scale(arch: str, block_weights: str, lines_alpha: float, lines_beta: float):
    bw = merge.parse_block_weights(block_weights, arch) if block_weights.strip() else None
    lines = merge.lines_key_scale(arch, lines_alpha, lines_beta) if lines_beta != 0 else None
    return merge.combine_key_scales(bw.key_scale() if bw else None, lines)


def plan_record(node: str, facts: HostFacts, loaded: list[Loaded], rec: dict) -> dict:
    """Which (entry, scaled strength) pairs land on which weight, for one fuse record; no delta computed yet."""
    accel = [p for a in loaded if a.role == "accel" for p in a.pairs()]
    style_adapters = [a for a in loaded if a.role == "style"]
    styles = [a.pairs() for a in style_adapters]
    scales = [checked(node, style_scale, facts.arch, a.block_weights_or(rec["block_weights"]), rec["lines_alpha"],
                      rec["lines_beta"]) for a in style_adapters]
    return checked(node, merge.plan_merge, accel, styles, facts.shapes,
                   {m: hk for a in loaded for m, hk in a.matched.items()}, mode=rec["merge_mode"],
                   style_key_scale=scales)


def check_shapes(node: str, key: str, shape, accel_items, present) -> None:
    """Shape errors at fuse time, not at sampling time (from tensor shapes alone; see lora.fuse)."""
    checked(node, check_key_shapes, [*accel_items, *(i for _, its in present for i in its)], key, shape)


# ---------------------------------------------------------------- FewStep LoRA Fuse

class FewStepLoraFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        options = lora_options()
        style_inputs = []
        for i in range(1, N_STYLES + 1):
            style_inputs += [
                io.Combo.Input(f"style_lora_{i}", options=options, default=NONE,
                               tooltip=f"Style LoRA {i} (any LoRA/LoCon/LoHa/LoKr/GLoRA/OFT/BOFT/IA3/DoRA "
                                       f".safetensors; kohya, PEFT and diffusers key names). 'none' = unused."),
                io.Float.Input(f"style_strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip=f"Strength of style LoRA {i} (0 = skip it)."),
            ]
        return io.Schema(
            node_id="FewStepLoraFuse", display_name=FUSE, category="loaders",
            description="Fuses an acceleration LoRA (LCM/TCD/PCM/Hyper-SD/Lightning) and style LoRAs (3 here, "
                        "any number more through style_stack) into the model exactly: one fp32 delta per weight, "
                        "rounded once. Merges styles linearly or with TIES/DARE, with block weights and LiNeS; "
                        "PEFT/diffusers keys that core ComfyUI drops are applied. The report says what matched and "
                        "which preset the acceleration LoRA needs. The input model is untouched (clone + patches, "
                        "unpatched bit-exactly). Connect a CLIP to apply the LoRAs' text-encoder parts too.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5/SD2/SDXL model to fuse into (it is cloned, never modified)."),
                io.Combo.Input("accel_lora", options=options, default=NONE,
                               tooltip="Acceleration LoRA (LCM-LoRA, TCD, PCM, Hyper-SD, SDXL-Lightning). It is "
                                       "always added linearly at full block weight; the report names its preset."),
                io.Float.Input("accel_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the acceleration LoRA (model cards use 1.0; Hyper-SD "
                                       "suggests 0.125 for some files)."),
                *style_inputs,
                io.Combo.Input("merge_mode", options=list(merge.MERGE_MODES), default="linear",
                               tooltip="How style LoRAs combine: linear = plain sum (what chained LoraLoaders do); "
                                       "ties = trim to top-density, elect sign, disjoint mean; dare = random drop "
                                       "with rescale; dare_ties = both. The acceleration LoRA is always linear."),
                io.Float.Input("density", default=0.2, min=0.01, max=1.0, step=0.01,
                               tooltip="TIES: fraction of each style delta's largest entries kept (per weight). "
                                       "Not used by dare_ties, where the random drop (drop_p) prunes."),
                io.Float.Input("drop_p", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="DARE: probability of dropping each delta entry (survivors scaled 1/(1-p))."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="DARE seed: the same seed gives the same merged weights."),
                io.String.Input("block_weights", default="",
                                tooltip="Per-block multipliers for the style LoRAs (not the acceleration LoRA): "
                                        "empty = all 1; a LoRA-Block-Weight preset (ALL, NONE, INS, IND, INALL, "
                                        "MIDD, OUTD, OUTS, OUTALL, MIDALL, ALL0.5) or a comma list (SD1.5: 17 or "
                                        "26 values, SDXL: 12 or 20; BASE first = text encoder). Slots follow "
                                        "sd-scripts: unlisted slots keep 1. The layout follows the model."),
                io.Float.Input("lines_alpha", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="LiNeS: style scale at the shallowest block (and outside the block stack). "
                                       "Only used when lines_beta is not 0."),
                io.Float.Input("lines_beta", default=0.0, min=-2.0, max=2.0, step=0.01,
                               tooltip="LiNeS: extra style scale added linearly with depth (deepest block gets "
                                       "alpha+beta). 0 = LiNeS off."),
                io.Combo.Input("on_unmatched", options=["error", "warn"], default="error",
                               tooltip="A LoRA module that matches no model weight: 'error' stops, 'warn' skips it "
                                       "and lists it in the report. Mostly-unmatched files always stop."),
                LoraStack.Input("style_stack", optional=True,
                                tooltip="More style LoRAs from FewStep LoRA Stack nodes, after style_lora_1..3. "
                                        "They merge in the same single pass, with the same mode, block weights "
                                        "and LiNeS."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional CLIP: the LoRAs' text-encoder parts are applied to a clone of it "
                                      "at each LoRA's strength (style LoRAs times the BASE block weight), as core "
                                      "'Load LoRA' does. Leave it empty to fuse the UNet only."),
            ],
            outputs=[io.Model.Output(tooltip="The fused model (a patched clone)."),
                     io.String.Output(display_name="report", tooltip="What was matched, skipped and detected."),
                     io.String.Output(display_name="preset",
                                      tooltip="Preset display name detected for the acceleration LoRA, or 'none'."),
                     io.Clip.Output(display_name="clip",
                                    tooltip="The clip input with the LoRAs' text-encoder parts applied (a patched "
                                            "clone); empty when no clip is connected.")])

    @classmethod
    def execute(cls, model, accel_lora, accel_strength, merge_mode, density, drop_p, seed, block_weights,
                lines_alpha, lines_beta, on_unmatched, style_stack=None, clip=None, **styles) -> io.NodeOutput:
        widgets = [(styles.get(f"style_lora_{i}", NONE), styles.get(f"style_strength_{i}", 1.0))
                   for i in range(1, N_STYLES + 1)]
        m, c, report, preset = fuse_model_and_clip(
            model, clip, accel_lora, accel_strength, widgets + stack_items(FUSE, style_stack), merge_mode=merge_mode,
            density=density, drop_p=drop_p, seed=seed, block_weights=block_weights, lines_alpha=lines_alpha,
            lines_beta=lines_beta, on_unmatched=on_unmatched)
        # The report also goes to the UI / history ("text"), so it is readable without a display node.
        return io.NodeOutput(m, report, preset, c, ui={"text": [report]})


def stack_items(node: str, stack) -> list[tuple[str, float, str]]:
    """The (name, strength, block weights) items of a FEWSTEP_LORA_STACK value (None = empty), checked.

    Items may also be (name, strength) pairs (block weights "" = the fuse node's)."""
    if stack is None:
        return []
    if not isinstance(stack, (list, tuple)) or not all(
            isinstance(it, (list, tuple)) and len(it) in (2, 3) and isinstance(it[0], str)
            and isinstance(it[1], (int, float)) and (len(it) == 2 or isinstance(it[2], str)) for it in stack):
        raise ValueError(f"{node}: style_stack must come from a {STACK} node (a list of (lora name, strength, "
                         f"block weights) items), got {type(stack).__name__}")
    return [(str(it[0]), float(it[1]), str(it[2]) if len(it) == 3 else "") for it in stack]


# ---------------------------------------------------------------- FewStep LoRA Stack

class FewStepLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepLoraStack", display_name=STACK, category="loaders",
            description="Adds a style LoRA to a stack for FewStep LoRA Fuse's style_stack input. Chain Stack nodes "
                        "to fuse any number of style LoRAs in one pass (one fp32 GEMM per weight, one rounding). "
                        "Each entry may carry its own block weights. Nothing is loaded here: files are read and "
                        "checked by the fuse node.",
            inputs=[
                io.Combo.Input("lora_name", options=lora_options(), default=NONE,
                               tooltip="Style LoRA to add (any LoRA/LoCon/LoHa/LoKr/GLoRA/OFT/BOFT/IA3/DoRA "
                                       ".safetensors). 'none' "
                                       "passes the stack through unchanged."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of this LoRA (0 = skip it)."),
                LoraStack.Input("stack", optional=True,
                                tooltip="LoRAs stacked so far (from another FewStep LoRA Stack); they come first."),
                io.String.Input("block_weights", default="", optional=True,
                                tooltip="This LoRA's own per-block multipliers (same syntax as the fuse node's "
                                        "block_weights: a preset or 17/26 values for SD1.5, 12/20 for SDXL). Empty "
                                        "= use the fuse node's block_weights. BASE also scales its text-encoder "
                                        "part."),
            ],
            outputs=[LoraStack.Output(display_name="stack",
                                      tooltip="The stack with this LoRA appended; wire it to FewStep LoRA Fuse's "
                                              "style_stack or to another Stack node.")])

    @classmethod
    def execute(cls, lora_name, strength, stack=None, block_weights="") -> io.NodeOutput:
        items = stack_items(STACK, stack)
        if lora_name != NONE and strength != 0:
            resolve_lora(STACK, lora_name)  # a missing file is named here, at the node that chose it
            if block_weights.strip():  # the syntax is checked here; the layout (SD1.5 vs SDXL) by the fuse node
                try:
                    merge.parse_block_weights(block_weights, "sd15")
                except ValueError as e:
                    try:
                        merge.parse_block_weights(block_weights, "sdxl")
                    except ValueError:
                        raise ValueError(f"{STACK}: block_weights of '{lora_name}': {e}") from None
            items.append((lora_name, float(strength), block_weights))
        return io.NodeOutput(tuple(items))


def fuse(model, accel_lora: str, accel_strength: float, styles: list[tuple[str, float]], **opts):
    """Model only (tests/bench): returns (patched clone, report, preset display name); see ``fuse_model_and_clip``."""
    m, _, report, preset = fuse_model_and_clip(model, None, accel_lora, accel_strength, styles, **opts)
    return m, report, preset


def fuse_model_and_clip(model, clip, accel_lora: str, accel_strength: float, styles: list[tuple[str, float]], *,
                        merge_mode="linear", density=0.2, drop_p=0.5, seed=0, block_weights="", lines_alpha=1.0,
                        lines_beta=0.0, on_unmatched="error"):
    """The node body: returns (patched model clone, patched CLIP clone or None, report, preset display name).

    With ``clip`` the adapters' text-encoder modules are applied to a clone of it (``apply_text_encoder``)."""
    import comfy.utils
    node = FUSE
    t0 = time.perf_counter()
    if merge_mode not in merge.MERGE_MODES:
        raise ValueError(f"{node}: merge_mode must be one of {merge.MERGE_MODES}, got {merge_mode!r}")
    if on_unmatched not in ("error", "warn"):
        raise ValueError(f"{node}: on_unmatched must be 'error' or 'warn', got {on_unmatched!r}")
    facts = HostFacts(node, model)
    checked(node, style_scale, facts.arch, block_weights, lines_alpha, lines_beta)  # fail before reading files
    loaded: list[Loaded] = []
    te = clip is not None
    if accel_lora != NONE and accel_strength != 0:
        loaded.append(load_adapter(node, facts, "accel", accel_lora, accel_strength, on_unmatched, clip_given=te))
    for item in styles:
        name, strength, own_bw = (tuple(item) + ("",))[:3]
        if name != NONE and strength != 0:
            if own_bw.strip():  # a bad vector is named with its LoRA, before any file is read
                try:
                    style_scale(facts.arch, own_bw, lines_alpha, lines_beta)
                except ValueError as e:
                    raise ValueError(f"{node}: block_weights of style LoRA '{name}' (from {STACK}): {e}") from None
            a = load_adapter(node, facts, "style", name, strength, on_unmatched, clip_given=te)
            a.block_weights = own_bw
            loaded.append(a)
    rec = {"adapters": [{"role": a.role, "name": a.name, "strength": float(a.strength),
                         "te_modules": te_modules(a.adapter), "block_weights": a.block_weights} for a in loaded],
           "merge_mode": merge_mode, "density": float(density), "drop_p": float(drop_p), "seed": int(seed),
           "block_weights": block_weights, "lines_alpha": float(lines_alpha), "lines_beta": float(lines_beta),
           "on_unmatched": on_unmatched, "base": facts.base}
    m = model.clone()
    n_keys = 0
    if loaded:
        plan = plan_record(node, facts, loaded, rec)
        pbar = comfy.utils.ProgressBar(len(plan))
        patches = {}
        for key, (shape, accel_items, present) in plan.items():
            pbar.update(1)
            # Block weights / LiNeS can scale a key to exactly 0: no patch, the weight stays untouched.
            if all(st == 0 for _, st in accel_items) and all(st == 0 for _, items in present for _, st in items):
                continue
            check_shapes(node, key, shape, accel_items, present)
            patches[key] = FusedDelta(node, functools.partial(
                merge.merged_key_delta, key, shape, accel_items, present, mode=rec["merge_mode"],
                density=rec["density"], p=rec["drop_p"], seed=rec["seed"], base_weight_fn=facts.base_weight))
        added = m.add_patches(patches, 1.0, 1.0)
        n_keys = len(added)
        if len(added) != len(patches):
            missing = sorted(set(patches) - set(added))[:5]
            raise ValueError(f"{node}: {len(patches) - len(added)} fused keys are not weights of the model, e.g. "
                             f"{missing}")
        m.model_options[FUSE_KEY] = list(model.model_options.get(FUSE_KEY, [])) + [rec]
    c, te_lines = None, []
    if clip is not None:
        def base_weight(a: Loaded) -> float:
            text = a.block_weights_or(block_weights)
            return merge.parse_block_weights(text, facts.arch).weight("BASE") if text.strip() else 1.0
        c, te_lines = apply_text_encoder(node, clip, loaded, base_weight)
    accel = next((a for a in loaded if a.role == "accel"), None)
    preset = preset_display(accel.det) if accel else NONE
    head = (f"{node}: model {facts.base.upper()}, {len(loaded)} adapter(s), {n_keys} weights patched in "
            f"{time.perf_counter() - t0:.2f} s; merge {merge_mode}"
            + (f" (density {density:g})" if merge_mode == "ties" else "")
            + (f" (drop_p {drop_p:g}, seed {seed})" if merge_mode in ("dare", "dare_ties") else "")
            + (f"; block weights '{block_weights}'" if block_weights.strip() else "")
            + (f"; LiNeS alpha {lines_alpha:g} beta {lines_beta:g}" if lines_beta != 0 else ""))
    lines = [head]
    for a in loaded:
        lines += report_lines(a, clip is not None)
    lines += te_lines
    if not loaded:
        lines.append("no LoRA selected (all 'none' or strength 0): the model is returned unchanged")
    lines.append(f"preset for sampling: {preset}" if preset != NONE else
                 "preset for sampling: none (no recognised acceleration LoRA)")
    report = "\n".join(lines)
    LOG.info("%s", report)
    return m, c, report, preset


# ---------------------------------------------------------------- FewStep Save Fused

def fuse_records(model) -> list[dict]:
    return list(model.model_options.get(FUSE_KEY, []))


class FewStepSaveFused(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepSaveFused", display_name=SAVE, category="advanced/model_merging", is_output_node=True,
            description="Saves the fused model (and optionally CLIP and VAE) as a .safetensors checkpoint in the "
                        "output folder, with the fused adapters and fuse settings in its metadata.",
            inputs=[io.Model.Input("model", tooltip="Model from FewStep LoRA Fuse (any MODEL works)."),
                    io.Clip.Input("clip", optional=True, tooltip="Optional CLIP to include in the checkpoint."),
                    io.Vae.Input("vae", optional=True, tooltip="Optional VAE to include in the checkpoint."),
                    io.String.Input("filename_prefix", default="checkpoints/fewstep_fused",
                                    tooltip="Path under the output folder; a counter and .safetensors are added."),
                    io.Combo.Input("dtype", options=list(DTYPES), default="fp16",
                                   tooltip="Stored dtype of the floating-point weights (fused in fp32, rounded "
                                           "once into this).")],
            outputs=[io.String.Output(display_name="path", tooltip="Path of the saved file.")])

    @classmethod
    def execute(cls, model, filename_prefix, dtype, clip=None, vae=None) -> io.NodeOutput:
        prompt = getattr(getattr(cls, "hidden", None), "prompt", None)
        path = save_fused(model, filename_prefix, dtype, clip=clip, vae=vae, prompt=prompt)
        return io.NodeOutput(path)


def save_fused(model, filename_prefix: str, dtype: str, clip=None, vae=None, prompt=None,
               output_dir: Optional[str] = None) -> str:
    import comfy.model_management
    import comfy.utils
    import folder_paths
    node = SAVE
    if dtype not in DTYPES:
        raise ValueError(f"{node}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out_dir = output_dir or folder_paths.get_output_directory()
    try:
        folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    except Exception as e:
        raise ValueError(f"{node}: filename_prefix {filename_prefix!r}: {e}") from None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
    records = fuse_records(model)
    # The records hold file names and settings only: local paths stay out of a file people share.
    metadata = {"fewstep.fuse": json.dumps(records), "fewstep.dtype": dtype,
                "fewstep.other_patched_weights": str(len(foreign_patched_keys(model))),
                "fewstep.adapters": ", ".join(f"{a['role']}:{a['name']}@{a['strength']:g}"
                                              for r in records for a in r["adapters"])}
    base = model_base(model)
    if base == "sdxl":
        metadata.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
                         "modelspec.implementation": "sgm", "modelspec.title": f"{filename} {counter}"})
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    load = [model] + ([clip.load_model()] if clip is not None else [])
    comfy.model_management.load_models_gpu(load, force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip.get_sd() if clip is not None else None,
                                           vae.get_sd() if vae is not None else None, None)
    want = DTYPES[dtype]
    sd = {k: (t.to(want) if t.is_floating_point() else t).contiguous() for k, t in sd.items()}
    comfy.utils.save_torch_file(sd, path, metadata=metadata)
    LOG.info("%s: saved %d tensors (%s) to %s", node, len(sd), dtype, path)
    return path


# ---------------------------------------------------------------- FewStep Export LoRA

class FewStepExportLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepExportLora", display_name=EXPORT, category="advanced/model_merging", is_output_node=True,
            description="Exports what the model's patches add to its base (FewStep LoRA Fuse's acceleration + "
                        "merged styles, and any core LoRA loaders chained with it) as one kohya LoRA by "
                        "seeded randomized SVD, at a fixed rank or an energy threshold, with the text-encoder part "
                        "when the fused clip is connected. The report lists the overall and worst per-key relative "
                        "Frobenius errors.",
            inputs=[io.Model.Input("model", tooltip="Model from FewStep LoRA Fuse. Everything patched onto it is "
                                                    "exported: the fuse's deltas exactly (recomputed from the "
                                                    "files), and patches of other nodes (e.g. a core LoRA loader "
                                                    "before or after the fuse) as the host applies them."),
                    io.Combo.Input("mode", options=["rank", "energy"], default="rank",
                                   tooltip="rank = fixed rank for every weight; energy = smallest rank keeping "
                                           "this fraction of each delta's Frobenius norm."),
                    io.Int.Input("rank", default=64, min=1, max=1024,
                                 tooltip="Rank in 'rank' mode; the rank cap in 'energy' mode."),
                    io.Float.Input("energy", default=0.99, min=0.5, max=1.0, step=0.001,
                                   tooltip="Energy mode: kept fraction sqrt(sum of kept sigma^2 / total)."),
                    io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                                   tooltip="Stored dtype of the LoRA factors (errors are measured after the cast)."),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                 tooltip="Seed of the randomized SVD sketch (same seed, same file)."),
                    io.String.Input("filename_prefix", default="loras/fewstep_export",
                                    tooltip="Path under the output folder; a counter and .safetensors are added."),
                    io.Clip.Input("clip", optional=True,
                                  tooltip="Optional: the clip output of FewStep LoRA Fuse. Its text-encoder "
                                          "patches are exported too (as lora_te* modules); without it the export "
                                          "holds the UNet part only and the report says what was left out.")],
            outputs=[io.String.Output(display_name="report", tooltip="Errors of the export and the file path.")])

    @classmethod
    def execute(cls, model, mode, rank, energy, dtype, seed, filename_prefix, clip=None) -> io.NodeOutput:
        _path, report = export_fused(model, mode=mode, rank=rank, energy=energy, dtype=dtype, seed=seed,
                                     filename_prefix=filename_prefix, clip=clip)
        return io.NodeOutput(report)


def _plain_fuse_patch(p) -> bool:
    """A FewStep LoRA Fuse patch as the fuse adds it (strengths 1, no offset or function): its delta is exact."""
    strength, adapter, strength_model, offset, function = p[:5]
    return (isinstance(adapter, FusedDelta) and strength == 1.0 and strength_model == 1.0 and offset is None
            and function is None)


def fused_deltas(node: str, model) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, fp32 delta) for every weight patch ``model`` carries, one key at a time (nothing accumulated).

    A key patched only by FewStep LoRA Fuse nodes gives the sum of their exact fp32 deltas. A key that also carries
    other patches (core LoRA loaders before or after the fuse, model merges) gives what the host applies: its own
    ``calculate_weight`` over the key's whole patch list, minus the unpatched weight. So the export is the model's
    whole difference from its base, never the fuse's part alone."""
    import comfy.lora
    import comfy.utils
    keys = sorted(k for k, ps in model.patches.items() if ps)
    if not keys:
        raise ValueError(f"{node}: the model carries no weight patches; connect the MODEL output of FewStep LoRA "
                         "Fuse (or of LoRA loaders)")

    def gen():
        for k in keys:
            ps = model.patches[k]
            if all(_plain_fuse_patch(p) for p in ps):
                d = None
                for p in ps:
                    try:
                        x = p[1].compute(device=None)
                    except ValueError as e:
                        raise ValueError(f"{node}: {e}") from None
                    d = x if d is None else (d if x is None else d + x)
                if d is not None:
                    yield k, d
                continue
            bk = model.backup.get(k)
            w = (bk.weight if bk is not None else comfy.utils.get_attr(model.model, k)).to(torch.float32)
            yield k, comfy.lora.calculate_weight(ps, w.clone(), k) - w
    return gen()


def foreign_patched_keys(model) -> list[str]:
    """Weights of ``model`` with patches from other nodes than FewStep LoRA Fuse (e.g. core LoRA loaders)."""
    return sorted(k for k, ps in model.patches.items() if ps and not all(_plain_fuse_patch(p) for p in ps))


def kohya_te_names(clip_key_map: dict[str, str]) -> dict[str, str]:
    """CLIP weight key -> the kohya module name kohya writes for it, from the host's CLIP key map (lora key -> weight).

    The host maps several spellings onto one weight: ``lora_te_*`` (one encoder: SD1.x/2.x) and
    ``lora_te1_*``/``lora_te2_*`` (SDXL's two; the host also accepts ``lora_te1_`` for SD1.x). The model has two
    encoders exactly when some ``lora_te2_`` name exists. A weight with no name of the preferred family (e.g. SD1.x
    ``text_projection``, only ``lora_te1_``) keeps the name the host has for it."""
    kohya = [(lk, hk) for lk, hk in clip_key_map.items() if lk.startswith("lora_te")]
    two_encoders = any(lk.startswith("lora_te2_") for lk, _ in kohya)
    fallback: dict[str, str] = {}
    for lk, hk in kohya:
        fallback.setdefault(hk, lk)
    preferred = {hk: lk for lk, hk in kohya if lk.startswith(("lora_te1_", "lora_te2_")) == two_encoders}
    return {**fallback, **preferred}


def clip_deltas(clip) -> tuple[list[str], list[str], dict[str, str], Iterator[tuple[str, torch.Tensor]]]:
    """(exported CLIP keys, patched keys with no kohya name, key -> kohya ``lora_te*`` module name, iterator of
    (key, fp32 delta)) for the weight patches ``clip`` carries; a delta is the host's own patch result minus the
    unpatched weight."""
    import comfy.lora
    import comfy.utils
    p = clip.patcher
    names = kohya_te_names(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}))
    keys = sorted(k for k in p.patches if k in names)
    unnamed = sorted(k for k in p.patches if k not in names)

    def gen():
        for k in keys:
            bk = p.backup.get(k)
            w = (bk.weight if bk is not None else comfy.utils.get_attr(p.model, k)).to(torch.float32)
            out = comfy.lora.calculate_weight(p.patches[k], w.clone(), k)
            yield k, out - w
    return keys, unnamed, names, gen()


def export_fused(model, *, mode="rank", rank=64, energy=0.99, dtype="fp16", seed=0,
                 filename_prefix="loras/fewstep_export", output_dir: Optional[str] = None, method="randomized",
                 clip=None):
    """The node body: returns (path, report). With ``clip`` its text-encoder patches are exported too."""
    import itertools
    import folder_paths
    node = EXPORT
    if dtype not in DTYPES:
        raise ValueError(f"{node}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if mode not in ("rank", "energy"):
        raise ValueError(f"{node}: mode must be 'rank' or 'energy', got {mode!r}")
    t0 = time.perf_counter()
    deltas = ((k, d) for k, d in fused_deltas(node, model) if torch.any(d))
    foreign = foreign_patched_keys(model)
    te_keys, te_unnamed, te_names = [], [], {}
    if clip is not None:
        te_keys, te_unnamed, te_names, te_deltas = clip_deltas(clip)
        deltas = itertools.chain(deltas, te_deltas)
    kw = dict(rank=rank, energy=None, dtype=DTYPES[dtype]) if mode == "rank" else \
        dict(rank=None, energy=energy, max_rank=rank, dtype=DTYPES[dtype])
    kw["lora_names"] = te_names
    from ..lora import export as lora_export
    if method == "full":
        sd, rep = checked(node, lora_export.full_svd_export, deltas, **kw)
    else:
        sd, rep = checked(node, lora_export.export_lora, deltas, seed=seed, **kw)
    out_dir = output_dir or folder_paths.get_output_directory()
    folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
    records = fuse_records(model)
    meta = {"fewstep.fuse": json.dumps(records), "fewstep.export": json.dumps(
        {"mode": mode, "rank": rank, "energy": energy, "seed": seed, "method": rep.method,
         "overall_rel_error": rep.overall_rel_error, "other_patched_weights": len(foreign)})}
    checked(node, lora_export.save_lora, path, sd, rep, meta)
    worst = rep.worst(10)
    ranks = [k.rank for k in rep.keys if k.rank]
    lines = [f"{node}: {len(rep.keys)} weights exported ({rep.method} SVD, "
             + (f"rank {rank}" if mode == "rank" else f"energy {energy:g}, rank cap {rank}")
             + f", ranks {min(ranks) if ranks else 0}..{max(ranks) if ranks else 0}) in "
               f"{time.perf_counter() - t0:.2f} s",
             f"overall relative Frobenius error: {rep.overall_rel_error:.4%}",
             f"file: {path}",
             "worst keys (relative Frobenius error, rank):"]
    lines += [f"  {k.rel_error:.4%}  r={k.rank}  {k.key}" for k in worst]
    if rep.skipped_zero:
        lines.append(f"zero deltas skipped: {len(rep.skipped_zero)}")
    if foreign:
        lines.append(f"{len(foreign)} weights also carry patches from other nodes (e.g. core LoRA loaders); they are "
                     f"exported as the host applies them, so the file holds the model's whole change (e.g. "
                     f"{foreign[0]})")
    te_in_files = sum(a.get("te_modules", 0) for r in records for a in r["adapters"])
    if clip is not None:
        lines.append(f"text encoder: {len(te_keys)} weights exported from the connected clip"
                     + (f"; {len(te_unnamed)} patched clip weights have no kohya LoRA name and are left out "
                        f"(e.g. {te_unnamed[0]})" if te_unnamed else ""))
    elif te_in_files:
        lines.append(f"text encoder: NOT exported -- the fused LoRAs have {te_in_files} text-encoder modules; "
                     f"connect FewStep LoRA Fuse's clip output (with its clip input connected) to include them")
        LOG.warning("%s: %d text-encoder modules of the fused LoRAs are not in the export (no clip connected)",
                    node, te_in_files)
    report = "\n".join(lines)
    LOG.info("%s", report)
    return path, report


NODES = [FewStepLoraFuse, FewStepLoraStack, FewStepSaveFused, FewStepExportLora]
