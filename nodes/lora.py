"""LoRA nodes, fuse side: FewStep LoRA Fuse and FewStep LoRA Stack.

* FewStep LoRA Fuse -> a MODEL clone with one lazy ``FusedDelta`` patch per touched weight: when the host patches
  the weight it computes that weight's whole delta (all adapters, one fp32 GEMM for plain LoRAs), adds it to the fp32
  weight and rounds once; unpatching restores the backed-up weights bit for bit. Only the LoRA factors are held,
  so the extra memory while patching is one layer's delta. Plus a report (matched/unmatched keys, text-encoder keys
  applied or left out, detected base model and acceleration kind/preset), and a ``FuseRecord`` on the model.
* FewStep LoRA Stack -> a FEWSTEP_LORA_STACK of (lora name, strength, block weights) items for the fuse.

Saving and exporting live in ``nodes.lora_save``; host facts, the patch and the record in ``nodes.lora_host``. All
math lives in ``lora/`` (no comfy imports there); this module passes host facts in and turns ``ValueError`` into
one naming the node.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import time

from comfy_api.v0_0_2 import io

from ..lora import families, formats, keys, merge  # detect is imported where used (start-up time)
from ..lora.fuse import check_key_shapes
from ..lora.placement import place
from .common import CATEGORIES, checked
from .lora_host import (FUSE_KEY, NONE, FusedAdapter, FusedDelta, FuseRecord, HostFacts, PatchProgress,
                        adapter_files, lora_options, model_file_from_prompt, range_limit, resolve_lora)
from .validate import validated

LOG = logging.getLogger("fewstep")

N_STYLES = 3
MOST_UNMATCHED = 0.5  # more than this fraction of an adapter's modules unmatched -> always an error

FUSE = "FewStep LoRA Fuse"
STACK = "FewStep LoRA Stack"
LoraStack = io.Custom("FEWSTEP_LORA_STACK")  # a tuple of (lora file name, strength, block weights), stacking order


# ---------------------------------------------------------------- reading + checking adapters

class Loaded:
    def __init__(self, role: str, name: str, path: str, strength: float, adapter, matched, unmatched, det,
                 variant_only=None):
        self.role, self.name, self.path, self.strength = role, name, path, strength
        self.adapter, self.matched, self.unmatched, self.det = adapter, matched, unmatched, det
        self.variant_only = variant_only or {}  # what -> modules only other variants of the family have (I2V keys)
        self.block_weights = ""  # this LoRA's own block weights (from a Stack entry); "" = the fuse node's
        self.warnings: list[str] = []

    def block_weights_or(self, default: str) -> str:
        return self.block_weights if self.block_weights.strip() else default

    def pairs(self):
        """(entry, strength) of the matched modules, an entry on some rows of a fused weight wrapped
        (``lora.placement``)."""
        return place([(e, self.strength) for e in self.adapter.entries if e.name in self.matched], self.matched)[0]

    def hosts(self) -> dict[str, str]:
        return {m: t.key for m, t in self.matched.items()}


def preset_display(det) -> str:
    """The preset detection names (``Preset.name``), or 'none'."""
    return det.preset_name if det is not None and det.preset_name else NONE


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
                         f"{formats.SUPPORTED}")
    from ..lora import detect as lora_detect
    det = checked(node, lora_detect.detect, adapter, blocks=facts.blocks)
    model_label = families.label(facts.base)
    made_for = ([det.base_model] if det.base_model else list(det.candidates))
    if made_for and facts.base not in made_for:
        raise ValueError(f"{node}: {path} was made for {' or '.join(map(families.label, made_for))} but the model "
                         f"is {model_label} ({'; '.join(det.evidence[:1])}). Use a LoRA for {model_label}.")
    matched, unmatched = facts.mapper.match(modules)
    unmatched, variant = facts.mapper.split_variant_only(unmatched)
    n_own = len(modules) - sum(len(v) for v in variant.values())
    if unmatched and (on_unmatched == "error" or len(unmatched) > MOST_UNMATCHED * n_own):
        fits = (f"its module names fit {' / '.join(families.label(c) for c in det.candidates)}; "
                if det.candidates else "")
        checked(node, keys.require_all_matched, path, unmatched, layout=facts.family.keys,
                hint=f"Is the adapter made for another base model? ({fits}the model is {model_label})")
    if unmatched:
        LOG.warning("%s: %s: %d of %d UNet modules match no model weight and are skipped, first: %s",
                    node, path, len(unmatched), len(modules), unmatched[:5])
    for what, mods in variant.items():
        LOG.info("%s: %s: %d %s are not in this model (another variant of %s) and are skipped", node, path,
                 len(mods), what, model_label)
    return Loaded(role, name, path, strength, adapter, matched, unmatched, det, variant)


def report_lines(a: Loaded, clip_given: bool = False) -> list[str]:
    det = a.det
    n_mod = len(a.adapter.modules())
    lines = [f"[{a.role}] {a.name} (strength {a.strength:g}"
             + (f", own block weights '{a.block_weights}'" if a.block_weights.strip() else "") + ")",
             f"  format: {a.adapter.summary()}",
             f"  UNet modules matched {len(a.matched)}/{n_mod}, unmatched {len(a.unmatched)}"
             + (f" (skipped: {', '.join(a.unmatched[:5])}{' ...' if len(a.unmatched) > 5 else ''})"
                if a.unmatched else ""),
             *[f"  {len(mods)} {what}: not in this model, skipped (e.g. {mods[0]})"
               for what, mods in a.variant_only.items()],
             f"  text-encoder keys: {len(a.adapter.text_encoder_keys)}"
             + (" (connect clip to apply them)" if a.adapter.text_encoder_keys and not clip_given else ""),
             f"  unrecognised tensor names left unused: {len(a.adapter.unknown_keys)}",
             *([f"  bundled embeddings: {len(a.adapter.embedding_keys)} tensors, not applied (load them as "
                f"textual-inversion embeddings)"] if a.adapter.embedding_keys else []),
             f"  base model: {families.label(det.base_model) if det.base_model else 'unknown'}"]
    if det.kind != "unknown":
        lines.append(f"  detected: {det.kind}{' (' + det.expert + '-noise expert)' if det.expert else ''} -> preset "
                     f"{preset_display(det)} (confidence {det.confidence})")
    elif det.accel_like_structure:
        lines.append(f"  detected: acceleration-shaped LoRA of an unknown release -- the structure looks like a "
                     f"distillation LoRA, nothing names the release; pick the preset by hand (confidence "
                     f"{det.confidence})")
    elif a.role == "accel":  # an ordinary style LoRA is not expected to be an acceleration LoRA: nothing to say
        lines.append(f"  detected: not a recognised acceleration LoRA (confidence {det.confidence}); pick the "
                     f"preset by hand")
    if det.kind != "unknown" or det.accel_like_structure or a.role == "accel":
        lines += [f"    - {e}" for e in det.evidence]
    lines += [f"  WARNING: {w}" for w in a.warnings]
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

def style_scale(arch, block_weights: str, lines_alpha: float, lines_beta: float):
    bw = merge.parse_block_weights(block_weights, arch) if block_weights.strip() else None
    lines = merge.lines_key_scale(arch, lines_alpha, lines_beta) if lines_beta != 0 else None
    return merge.combine_key_scales(bw.key_scale() if bw else None, lines)


def plan_record(node: str, facts: HostFacts, loaded: list[Loaded], rec: FuseRecord) -> dict:
    """Which (entry, scaled strength) pairs land on which weight, for one fuse record; no delta computed yet."""
    accel = [p for a in loaded if a.role == "accel" for p in a.pairs()]
    style_adapters = [a for a in loaded if a.role == "style"]
    styles = [a.pairs() for a in style_adapters]
    scales = [checked(node, style_scale, facts.blocks, a.block_weights_or(rec.block_weights), rec.lines_alpha,
                      rec.lines_beta) for a in style_adapters]
    return checked(node, merge.plan_merge, accel, styles, facts.shapes,
                   {m: hk for a in loaded for m, hk in a.hosts().items()}, mode=rec.merge_mode,
                   style_key_scale=scales)


def check_shapes(node: str, key: str, shape, accel_items, present) -> None:
    """Shape errors at fuse time, not at sampling time (from tensor shapes alone; see lora.fuse)."""
    checked(node, check_key_shapes, [*accel_items, *(i for _, its in present for i in its)], key, shape)


def fused_patches(node: str, facts: HostFacts, loaded: list[Loaded], rec: FuseRecord) -> dict[str, FusedDelta]:
    """One lazy ``FusedDelta`` per weight the record touches (shapes checked now, deltas computed at patch time)."""
    import comfy.utils
    plan = plan_record(node, facts, loaded, rec)
    pbar = comfy.utils.ProgressBar(len(plan))
    patches = {}
    progress = PatchProgress(len(plan))  # shared by this fuse's patches: ticks as the host applies them
    for key, (shape, accel_items, present) in plan.items():
        pbar.update(1)
        # Block weights / LiNeS can scale a key to exactly 0: no patch, the weight stays untouched.
        if all(st == 0 for _, st in accel_items) and all(st == 0 for _, items in present for _, st in items):
            continue
        check_shapes(node, key, shape, accel_items, present)
        patches[key] = FusedDelta(node, functools.partial(
            merge.merged_key_delta, key, shape, accel_items, present, mode=rec.merge_mode, density=rec.density,
            p=rec.drop_p, seed=rec.seed, base_weight_fn=facts.base_weight), progress,
            limit=range_limit(facts.sd[key]), files=adapter_files(accel_items, *(its for _, its in present)))
    progress.total = max(1, len(patches))
    return patches


# ---------------------------------------------------------------- FewStep LoRA Fuse

@validated
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
            node_id="FewStepLoraFuse", display_name=FUSE, category=CATEGORIES["loaders"],
            description="Fuses an acceleration LoRA (LCM/TCD/PCM/Hyper-SD/Lightning; lightx2v, CausVid, Wan 2.2 "
                        "Lightning, Qwen-Image-Lightning, Hyper-FLUX, FLUX Turbo-Alpha, Hyper-SD3, PCM-SD3, FastVideo) "
                        "and style LoRAs (3 here, any number more through style_stack) into the model exactly: one "
                        "delta per weight, rounded once (fp8 too). Merges styles linearly or with TIES/DARE, with "
                        "block weights and LiNeS; PEFT/diffusers keys that core ComfyUI drops are applied. The report "
                        "says what matched and which preset the acceleration LoRA needs. The input model is untouched "
                        "(clone + patches, unpatched bit-exactly). Connect a CLIP to apply the LoRAs' text-encoder "
                        "parts too.",
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="SD1.5/SD2/SDXL, SD3, Flux, Wan 2.1/2.2, Qwen-Image or HunyuanVideo "
                                                "model to fuse into (it is cloned, never modified)."),
                io.Combo.Input("accel_lora", options=options, default=NONE,
                               tooltip="Acceleration LoRA (LCM-LoRA, TCD, PCM, Hyper-SD, SDXL-Lightning; lightx2v, "
                                       "CausVid, Wan 2.2 Lightning, Qwen-Image-Lightning, Hyper-FLUX, Turbo-Alpha, "
                                       "Hyper-SD3, PCM-SD3). It is always added linearly at full block weight; the "
                                       "report names its preset."),
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
                             tooltip="DARE seed, used by merge_mode dare and dare_ties only (the graph editor shows "
                                     "it only then): the same seed gives the same merged weights. Keep its "
                                     "control on 'fixed', or every run fuses anew."),
                io.String.Input("block_weights", default="",
                                tooltip="Per-block multipliers for the style LoRAs (not the acceleration LoRA): "
                                        "empty = all 1; a LoRA-Block-Weight preset (ALL, NONE, INS, IND, INALL, "
                                        "MIDD, OUTD, OUTS, OUTALL, MIDALL, ALL0.5; DiTs: ALL, NONE, ALL0.5) or a "
                                        "comma list (SD1.5: 17 or 26 values, SDXL: 12 or 20; BASE first = text "
                                        "encoder; a DiT: one per block, or BASE, IN, one per block, OUT -- Flux: "
                                        "CLIP, T5, IN, D00-D18, S00-S37, OUT). Slots follow sd-scripts: unlisted "
                                        "slots keep 1. The layout follows the model."),
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
            lines_beta=lines_beta, on_unmatched=on_unmatched,
            model_file=model_file_from_prompt(getattr(cls.hidden, "prompt", None),
                                              getattr(cls.hidden, "unique_id", None)))
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

@validated
class FewStepLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepLoraStack", display_name=STACK, category=CATEGORIES["loaders"],
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
                                        "block_weights: a preset or 17/26 values for SD1.5, 12/20 for SDXL, one per "
                                        "block (or BASE, IN, blocks, OUT) for a DiT). Empty = use the fuse node's "
                                        "block_weights. BASE also scales its text-encoder part."),
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
                checked(f"{STACK}: block_weights of '{lora_name}'", merge.check_block_weights, block_weights)
            items.append((lora_name, float(strength), block_weights))
        return io.NodeOutput(tuple(items))


def fuse(model, accel_lora: str, accel_strength: float, styles: list[tuple[str, float]], **opts):
    """Model only (tests/bench): returns (patched clone, report, preset display name); see ``fuse_model_and_clip``."""
    m, _, report, preset = fuse_model_and_clip(model, None, accel_lora, accel_strength, styles, **opts)
    return m, report, preset


def fuse_model_and_clip(model, clip, accel_lora: str, accel_strength: float, styles: list[tuple[str, float]], *,
                        merge_mode="linear", density=0.2, drop_p=0.5, seed=0, block_weights="", lines_alpha=1.0,
                        lines_beta=0.0, on_unmatched="error", model_file=""):
    """The node body: returns (patched model clone, patched CLIP clone or None, report, preset display name).

    With ``clip`` the adapters' text-encoder modules are applied to a clone of it (``apply_text_encoder``).
    ``model_file``: the file the model was loaded from, when the workflow tells (a Wan 2.2 expert LoRA is checked
    against the expert the file is)."""
    node = FUSE
    t0 = time.perf_counter()
    if merge_mode not in merge.MERGE_MODES:
        raise ValueError(f"{node}: merge_mode must be one of {merge.MERGE_MODES}, got {merge_mode!r}")
    if on_unmatched not in ("error", "warn"):
        raise ValueError(f"{node}: on_unmatched must be 'error' or 'warn', got {on_unmatched!r}")
    facts = HostFacts(node, model)
    checked(node, style_scale, facts.blocks, block_weights, lines_alpha, lines_beta)  # fail before reading files
    loaded = load_all(node, facts, accel_lora, accel_strength, styles, lines_alpha, lines_beta, on_unmatched,
                      clip is not None)
    check_experts(loaded, model_file)
    rec = FuseRecord(adapters=tuple(FusedAdapter(a.role, a.name, float(a.strength), te_modules(a.adapter),
                                                 a.block_weights) for a in loaded),
                     merge_mode=merge_mode, density=float(density), drop_p=float(drop_p), seed=int(seed),
                     block_weights=block_weights, lines_alpha=float(lines_alpha), lines_beta=float(lines_beta),
                     on_unmatched=on_unmatched, base=facts.base)
    m = model.clone()
    n_keys = 0
    if loaded:
        patches = fused_patches(node, facts, loaded, rec)
        added = m.add_patches(patches, 1.0, 1.0)
        n_keys = len(added)
        if len(added) != len(patches):
            missing = sorted(set(patches) - set(added))[:5]
            raise ValueError(f"{node}: {len(patches) - len(added)} fused keys are not weights of the model, e.g. "
                             f"{missing}")
        m.model_options[FUSE_KEY] = (*model.model_options.get(FUSE_KEY, ()), rec)
    c, te_lines = None, []
    if clip is not None:
        def base_weight(a: Loaded) -> float:
            text = a.block_weights_or(block_weights)
            return merge.parse_block_weights(text, facts.blocks).te_weight if text.strip() else 1.0
        c, te_lines = apply_text_encoder(node, clip, loaded, base_weight)
    accel = next((a for a in loaded if a.role == "accel"), None)
    preset = preset_display(accel.det) if accel else NONE
    report = fuse_report(node, facts, loaded, rec, n_keys, time.perf_counter() - t0, te_lines, clip is not None,
                         preset)
    LOG.info("%s", report.splitlines()[0] + f"; preset {preset}")  # one line; the node's UI output has the rest
    LOG.debug("%s", report)
    return m, c, report, preset


EXPERT_RE = re.compile(r"(?<![a-z])(high|low)[-_ ]?noise(?![a-z])")


def check_experts(loaded: list[Loaded], model_file: str) -> None:
    """A Wan 2.2 two-expert LoRA fused into the other expert (by the model's file name) is called out in the report
    and the log, as are LoRAs for both experts in one fuse; without a file name the report says which expert the
    LoRA is for."""
    found = EXPERT_RE.search(os.path.basename(model_file or "").lower())
    model_expert = found.group(1) if found else ""
    experts = {a.det.expert for a in loaded if a.det.expert}
    for a in loaded:
        e = a.det.expert
        if not e:
            continue
        if model_expert and e != model_expert:
            a.warnings.append(f"this is the Wan 2.2 {e}-noise expert's LoRA, but the model is the {model_expert}-noise "
                              f"expert ({os.path.basename(model_file)}): fuse it into the {e}-noise model")
        elif len(experts) > 1:
            a.warnings.append(f"LoRAs for both Wan 2.2 experts are fused into one model; this one is for the "
                              f"{e}-noise expert")
        elif not model_expert:
            a.warnings.append(f"this is the Wan 2.2 {e}-noise expert's LoRA: fuse it into the {e}-noise model (the "
                              f"model's expert cannot be told from the workflow)")
        for w in a.warnings:
            LOG.warning("%s: %s: %s", FUSE, a.name, w)


def load_all(node: str, facts: HostFacts, accel_lora: str, accel_strength: float, styles, lines_alpha: float,
             lines_beta: float, on_unmatched: str, clip_given: bool) -> list[Loaded]:
    """The selected adapters read and checked, accel first (none / strength 0 skipped); a Stack entry's own block
    weights are checked before any file is read."""
    loaded: list[Loaded] = []
    if accel_lora != NONE and accel_strength != 0:
        loaded.append(load_adapter(node, facts, "accel", accel_lora, accel_strength, on_unmatched, clip_given))
    for item in styles:
        name, strength, own_bw = (tuple(item) + ("",))[:3]
        if name != NONE and strength != 0:
            if own_bw.strip():  # a bad vector is named with its LoRA, before any file is read
                checked(f"{node}: block_weights of style LoRA '{name}' (from {STACK})", style_scale, facts.blocks,
                        own_bw, lines_alpha, lines_beta)
            a = load_adapter(node, facts, "style", name, strength, on_unmatched, clip_given)
            a.block_weights = own_bw
            loaded.append(a)
    return loaded


def fuse_report(node: str, facts: HostFacts, loaded: list[Loaded], rec: FuseRecord, n_keys: int, seconds: float,
                te_lines: list[str], clip_given: bool, preset: str) -> str:
    head = (f"{node}: model {facts.base.upper()}, {len(loaded)} adapter(s), {n_keys} weights patched in "
            f"{seconds:.2f} s; merge {rec.merge_mode}"
            + (f" (density {rec.density:g})" if rec.merge_mode == "ties" else "")
            + (f" (drop_p {rec.drop_p:g}, seed {rec.seed})" if rec.merge_mode in ("dare", "dare_ties") else "")
            + (f"; block weights '{rec.block_weights}'" if rec.block_weights.strip() else "")
            + (f"; LiNeS alpha {rec.lines_alpha:g} beta {rec.lines_beta:g}" if rec.lines_beta != 0 else ""))
    lines = [head]
    for a in loaded:
        lines += report_lines(a, clip_given)
    lines += te_lines
    if not loaded:
        lines.append("no LoRA selected (all 'none' or strength 0): the model is returned unchanged")
    lines.append(f"preset for sampling: {preset}" if preset != NONE else
                 "preset for sampling: none (no recognised acceleration LoRA)")
    return "\n".join(lines)

NODES = [FewStepLoraFuse, FewStepLoraStack]
