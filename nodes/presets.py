"""Preset nodes: one click from "I loaded a Hyper-SD / Lightning / PCM / TCD / LCM LoRA" to the right sampling.

* FewStep Preset -> SAMPLER + SIGMAS + cfg (+ the card's distilled guidance) for SamplerCustom.
* FewStep Settings -> a MODEL patch so the plain KSampler uses a preset and gamma (sampler/scheduler
  ``fewstep_auto``, or ``fewstep_tcd`` reading gamma) -- carried in ``model_options`` only and read at sample time,
  so a node that replaces the model sampling (before or after this one) keeps it.

A flow preset's shift: the sigmas are placed with the card's shift on the model's own timestep scale (what core
ModelSamplingSD3 / ModelSamplingAuraFlow with that shift would give), unless the model carries a ModelSampling* node
(an object patch of ``model_sampling``): then that node's shift is used, and the log says so when it differs.
"""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..samplers import consistency
from ..samplers import presets as preset_table
from . import engine
from .common import CATEGORIES, advanced, checked, model_base
from .sampling import model_sampling
from .validate import validated

LOG = logging.getLogger("fewstep")

NONE = "none"
# Values of the old numeric widgets that mean "take it from the preset" (the frontend draws them as "from preset";
# saved workflows keep them, so they keep their meaning).
STEPS_FROM_PRESET = 0
GAMMA_FROM_PRESET = -1.0


def preset_input(with_none=False):
    options = ([NONE] if with_none else []) + list(preset_table.PRESET_NAMES)
    return io.Combo.Input("preset", options=options, default=options[0],
                          tooltip="Settings from the model card of the few-step LoRA/model you loaded. FewStep LoRA "
                                  "Fuse's report names the matching preset when it recognises the file.")


def check_prediction(node: str, preset, ms) -> None:
    """Log when the preset's checkpoint predicts x0 but the model samples as another type (garbage otherwise)."""
    if preset.prediction == "x0" and not any(c.__name__ == "X0" for c in type(ms).__mro__):
        LOG.warning("%s: preset %r is for an x0-prediction checkpoint, but the model samples as %s; add "
                    "ModelSamplingDiscrete with sampling 'x0' after the checkpoint loader", node, preset.name,
                    type(ms).__name__)


def user_model_sampling(model) -> bool:
    """Whether a node replaced the model's model sampling (core ModelSamplingSD3 / AuraFlow / Flux / Discrete)."""
    return "model_sampling" in getattr(model, "object_patches", {})


def log_kept_shift(node: str, preset, ms) -> None:
    """Say when a ModelSampling* node's shift is used instead of a flow preset's card shift."""
    shift = getattr(ms, "shift", None)
    if preset.flow and preset.shift is not None and shift is not None and float(shift) != preset.shift:
        LOG.info("%s: preset %r: the model's ModelSampling node sets shift %g; it is used (the card uses %g)", node,
                 preset.name, float(shift), preset.shift)


def preset_sigmas(node: str, model, preset, steps: int, strength: float):
    ms = model_sampling(node, model)
    check_prediction(node, preset, ms)
    keep = user_model_sampling(model)
    if keep:
        log_kept_shift(node, preset, ms)
    return checked(node, lambda: preset_table.preset_sigmas(preset, ms, steps, strength, model_base(model),
                                                            keep_model_shift=keep).cpu())


@validated
class FewStepPreset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepPreset", display_name="FewStep Preset", category=CATEGORIES["custom"],
            description="Sampler, sigmas and recommended cfg from the model cards: LCM-LoRA, TCD, PCM, Hyper-SD, "
                        "SDXL-Lightning, AnimateLCM, DMD2, SD(XL)-Turbo, Flash Diffusion on SD models; Hyper-SD3, "
                        "PCM-SD3, Hyper-FLUX, FLUX.1 Turbo-Alpha, Wan lightx2v / CausVid / Lightning, "
                        "Qwen-Image-Lightning and FastVideo on flow-matching models (with the card's shift unless a "
                        "ModelSampling node sets one). Wire into SamplerCustom.",
            inputs=[io.Model.Input("model", tooltip="The model to sample (its sigma table places the timesteps)."),
                    preset_input(),
                    io.Int.Input("steps", default=STEPS_FROM_PRESET, min=0, max=100,
                                 tooltip="Sampling steps. 'from preset' (the lowest value, stored as 0) = the "
                                         "preset's own step count; fixed-timestep presets ignore it."),
                    io.Float.Input("strength", default=1.0, min=0.01, max=1.0, step=0.01,
                                   tooltip="img2img strength with diffusers' rule for the preset's grid: LCM/TCD cut the "
                                           "original grid first; trailing/PCM keep the last int(steps*strength) "
                                           "timesteps; fixed-timestep presets need 1.0."),
                    io.Float.Input("gamma", default=GAMMA_FROM_PRESET, min=-1.0, max=1.0, step=0.01,
                                   tooltip="TCD gamma (0 = deterministic, 1 = LCM-like). 'from preset' (any value "
                                           "below 0, stored as -1) keeps the preset's gamma; TCD presets only.")],
            outputs=[io.Sampler.Output(), io.Sigmas.Output(),
                     io.Float.Output(display_name="cfg", tooltip="The model card's recommended cfg."),
                     io.Float.Output(display_name="guidance",
                                     tooltip="The card's distilled guidance for FluxGuidance (Flux 3.5, HunyuanVideo "
                                             "6); 0 when the card has none.")])

    @classmethod
    def execute(cls, model, preset, steps, strength, gamma) -> io.NodeOutput:
        node = "FewStep Preset"
        p = checked(node, preset_table.get_preset, preset)
        if gamma >= 0 and p.sampler != "tcd":
            raise ValueError(f"{node}: gamma applies to TCD presets only; preset {preset!r} uses {p.sampler}. "
                             "Set gamma to 'from preset' (drag it below 0).")
        options = {"gamma": p.gamma if gamma < 0 else gamma} if p.sampler == "tcd" else {}
        sampler = engine.make_sampler(p.sampler, **options)
        return io.NodeOutput(sampler, preset_sigmas(node, model, p, steps, strength), float(p.cfg),
                             float(p.guidance or 0.0))


@validated
class FewStepSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepSettings", display_name="FewStep Settings (KSampler)", category=CATEGORIES["ksampler"],
            description="Lets the plain KSampler use fewstep: pick sampler 'fewstep_auto' and scheduler "
                        "'fewstep_auto' to follow the preset (on flow-matching models with the card's shift, unless a "
                        "ModelSampling node sets one), or 'fewstep_tcd' with any scheduler to use this gamma. "
                        "Returns a patched clone; the input model is untouched.",
            inputs=[io.Model.Input("model", tooltip="The model to patch (it is cloned, never modified)."),
                    preset_input(with_none=True),
                    io.Float.Input("gamma", default=GAMMA_FROM_PRESET, min=-1.0, max=1.0, step=0.01,
                                   tooltip="TCD gamma for sampler fewstep_tcd and TCD presets (0 = deterministic, "
                                           "1 = LCM-like). 'from preset' (any value below 0, stored as -1) = the "
                                           "preset's gamma, 0.3 without a preset."),
                    advanced(io.Combo.Input("final_step", options=["x0", "diffusers"], default="x0",
                                            tooltip="Advanced. Last step: clean x0 (right for nearly everyone), or "
                                                    "exactly what diffusers returns.")),
                    advanced(io.Combo.Input("noise_device", options=list(consistency.NOISE_DEVICES), default="cpu",
                                            tooltip="Advanced. Where step noise is drawn ('cpu' reproduces a seed on "
                                                    "any device).")),
                    advanced(io.Combo.Input("fused", options=list(consistency.FUSED_MODES), default="auto",
                                            tooltip="Advanced. Fused CUDA step kernel: auto / on / off.")),
                    advanced(io.Int.Input("batch_offset", default=0, min=0, max=4096,
                                          tooltip="Advanced. Batch index of the first image; to re-render image k of "
                                                  "a batch alone, pick it with LatentFromBatch(k) and set this to "
                                                  "k."))],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, preset, gamma, final_step, noise_device, fused, batch_offset) -> io.NodeOutput:
        node = "FewStep Settings"
        settings = {"final_step": final_step, "noise_device": noise_device, "fused": fused,
                    "batch_offset": batch_offset}
        m = model.clone()
        if preset != NONE:
            p = checked(node, preset_table.get_preset, preset)
            ms = model_sampling(node, m)
            check_prediction(node, p, ms)
            checked(node, preset_table.check_base, p, model_base(m), ms)
            # The preset and the model's base (PCM's solver size) travel in model_options only: the fewstep_auto
            # sampler reads them from extra_args, the fewstep_auto scheduler from the model patcher it schedules for.
            settings.update(preset=p.name, base=model_base(m))
            if p.sampler == "tcd":
                settings["gamma"] = p.gamma
        if gamma >= 0:
            settings["gamma"] = gamma
        # clone() deep-copies model_options, so this never reaches the input model.
        m.model_options.setdefault("transformer_options", {})[consistency.SETTINGS_KEY] = settings
        return io.NodeOutput(m)


NODES = [FewStepPreset, FewStepSettings]
