"""FewStep Two-Expert Sampler: one node for Wan 2.2 A14B's high-noise / low-noise expert split.

Wan 2.2 A14B denoises with two models: the high-noise expert for the first steps (timesteps at or above the
boundary, 875 for T2V and 900 for I2V in the Wan 2.2 reference configs), the low-noise expert for the rest. In core
ComfyUI this takes two KSamplerAdvanced nodes with hand-matched step ranges (steps 0->b with leftover noise, b->end
with add_noise off). This node runs exactly those two stages through the host's own sampling entry point
(``comfy.sample.sample_custom``, what SamplerCustom runs), so previews, interrupts and the progress bar behave as in
core:

* stage 1: ``model_high`` over ``sigmas[:b+1]`` from the initial noise; the host's ``inverse_noise_scaling`` hands back
  the latent with its leftover noise (x / (1 - sigma_b) on flow models);
* stage 2: ``model_low`` over ``sigmas[b:]`` with no noise added; the host's ``noise_scaling`` brings it back to
  sigma_b, so stage 2 continues the same trajectory.

One progress bar runs over all steps. A fewstep sampler (LCM/TCD/PCM/Consistency, or a ``fewstep_*`` name from
KSamplerSelect) draws its step noise from ONE stream for both stages, so a stochastic run equals the single-model
run with the same model in both slots (the stage hand-over costs only float rounding); a core sampler behaves exactly
as core's two KSamplerAdvanced nodes do (a stochastic one restarts its noise at the boundary, as there).
"""
from __future__ import annotations

import inspect

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.v0_0_2 import io

from ..samplers import consistency
from ..samplers.noise import default_noise_sampler
from .common import CATEGORIES
from .validate import validated

NODE = "FewStep Two-Expert Sampler"
CAT = CATEGORIES["custom"]  # next to SamplerCustomAdvanced
_PACK = __name__.rsplit(".", 2)[0]  # the pack's import root ("fewstep" in tests, the folder name in a host)


def split_at(sigmas: torch.Tensor, boundary_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) sigmas as core SplitSigmas cuts them: ``sigmas[:b+1]`` and ``sigmas[b:]``, checked."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"the sigmas input has {sigmas.numel()} value(s); at least 2 (one step) are needed. Wire "
                         "the full schedule (e.g. BasicScheduler or FewStep Preset), not a SplitSigmas half")
    steps = sigmas.numel() - 1
    if not 0 <= boundary_step <= steps:
        raise ValueError(f"boundary_step {boundary_step} is outside the {steps}-step sigmas; choose 0..{steps} "
                         f"(0 = every step on model_low, {steps} = every step on model_high)")
    return sigmas[:boundary_step + 1], sigmas[boundary_step:]


def is_fewstep(sampler) -> bool:
    """True for a SAMPLER that runs one of this pack's k-diffusion samplers (they take a ``noise_sampler``)."""
    fn = getattr(sampler, "sampler_function", None)
    if not isinstance(sampler, comfy.samplers.KSAMPLER) or fn is None:
        return False
    inner = inspect.unwrap(fn)
    return getattr(inner, "__module__", "").startswith(_PACK + ".") and \
        "noise_sampler" in inspect.signature(inner).parameters


class OneStepNoiseStream:
    """The step noise a fewstep sampler would draw in one single-model run, shared by both stages: made at the
    first stage's start (from its seed, batch offset and noise device, resolved as the sampler resolves them), then
    continued by the second stage instead of restarted."""

    def __init__(self):
        self.sampler = None

    def get(self, x: torch.Tensor, extra_args: dict, options: dict):
        if self.sampler is None:
            opts = consistency.resolve_options("two-expert", options, extra_args)
            self.sampler = default_noise_sampler(x, extra_args.get("seed"), opts["batch_offset"],
                                                 cpu=opts["noise_device"] == "cpu")
        return self.sampler


def continued(sampler, stream: OneStepNoiseStream):
    """``sampler`` with its step noise taken from ``stream`` (a fewstep sampler), else ``sampler`` itself."""
    if not is_fewstep(sampler):
        return sampler
    fn = sampler.sampler_function

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                  noise_sampler=stream.get(x, extra_args, options), **options)

    return comfy.samplers.KSAMPLER(run, extra_options=sampler.extra_options, inpaint_options=sampler.inpaint_options)


def _progress(model, total: int, offset: int, x0_output: dict):
    """The host's preview/progress callback for one stage, counting steps over the whole two-stage run."""
    callback = latent_preview.prepare_callback(model, total, x0_output)
    return lambda step, x0, x, _stage_total: callback(step + offset, x0, x, total)


def check_pair(model_high, model_low) -> None:
    """Both experts must share a latent space (one family), or stage 2 would read stage 1's latent wrongly."""
    fmt_high = type(model_high.get_model_object("latent_format")).__name__
    fmt_low = type(model_low.get_model_object("latent_format")).__name__
    if fmt_high != fmt_low:
        raise ValueError(f"model_high and model_low have different latent spaces ({fmt_high} vs {fmt_low}); load "
                         "the two experts of one model (e.g. Wan 2.2 A14B high_noise and low_noise)")


@validated
class FewStepTwoExpertSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepTwoExpertSampler", display_name=NODE, category=CAT,
            description="Two-expert sampling (Wan 2.2 A14B): model_high runs the first boundary_step steps from the "
                        "noise, model_low the rest from its leftover noise -- the two KSamplerAdvanced stages of "
                        "core in one node. Any SAMPLER (fewstep or core) and any SIGMAS; the same model in both "
                        "slots gives the single-model run.",
            inputs=[
                io.Model.Input("model_high", tooltip="High-noise expert: runs steps 0 .. boundary_step-1."),
                io.Model.Input("model_low", tooltip="Low-noise expert: runs steps boundary_step .. end."),
                io.Boolean.Input("add_noise", default=True,
                                 tooltip="Add the seeded initial noise (off: the latent already carries its noise)."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise (and of a stochastic sampler's step noise)."),
                io.Float.Input("cfg_high", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="cfg of the high-noise stage (1 with a Lightning LoRA)."),
                io.Float.Input("cfg_low", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="cfg of the low-noise stage (1 with a Lightning LoRA)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning, used by both experts."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, used by both experts (no effect "
                                                          "at cfg 1)."),
                io.Sampler.Input("sampler", tooltip="Any SAMPLER: a FewStep sampler or preset, or core "
                                                    "KSamplerSelect (euler for Wan 2.2 Lightning)."),
                io.Sigmas.Input("sigmas", tooltip="The whole schedule, e.g. BasicScheduler(simple, 4) after "
                                                  "ModelSamplingSD3 shift 5, or FewStep Preset's SIGMAS."),
                io.Int.Input("boundary_step", default=2, min=0, max=10000,
                             tooltip="Steps run on model_high before switching to model_low (core SplitSigmas' "
                                     "step). Wan 2.2 Lightning 4-step: 2. Wan 2.2 switches below timestep 875 "
                                     "(T2V) / 900 (I2V): count the sigmas >= 0.875 / 0.9."),
                io.Latent.Input("latent_image", tooltip="The latent to start from (EmptyHunyuanLatentVideo / "
                                                        "Wan22ImageToVideoLatent for Wan)."),
            ],
            outputs=[io.Latent.Output(display_name="output", tooltip="The latent after the last step (as "
                                                                     "SamplerCustomAdvanced's output)."),
                     io.Latent.Output(display_name="denoised_output",
                                      tooltip="The model's last denoised prediction (as SamplerCustomAdvanced's "
                                              "denoised_output).")])

    @classmethod
    def execute(cls, model_high, model_low, add_noise, noise_seed, cfg_high, cfg_low, positive, negative,
                sampler, sigmas, boundary_step, latent_image) -> io.NodeOutput:
        try:
            high_sigmas, low_sigmas = split_at(sigmas, boundary_step)
            check_pair(model_high, model_low)
        except ValueError as e:
            raise ValueError(f"{NODE}: {e}") from None
        total = sigmas.numel() - 1
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model_high, latent["samples"])
        latent["samples"] = samples
        noise_mask = latent.get("noise_mask")
        if add_noise:
            noise = comfy.sample.prepare_noise(samples, noise_seed, latent.get("batch_index"))
        else:
            noise = torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout, device="cpu")
        stream, x0_output = OneStepNoiseStream(), {}
        disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
        stages = [(model_high, cfg_high, high_sigmas, 0), (model_low, cfg_low, low_sigmas, boundary_step)]
        last = model_high
        for model, cfg, stage_sigmas, offset in stages:
            if stage_sigmas.numel() < 2:  # boundary 0 or at the end: that expert has no step
                continue
            samples = comfy.sample.sample_custom(
                model, noise, cfg, continued(sampler, stream), stage_sigmas, positive, negative, samples,
                noise_mask=noise_mask, callback=_progress(model, total, offset, x0_output),
                disable_pbar=disable_pbar, seed=noise_seed)
            # The next stage starts from this latent with its leftover noise: no new noise (KSamplerAdvanced's
            # add_noise "disable"), the host's noise_scaling puts it back at the boundary sigma.
            noise = torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout, device="cpu")
            last = model
        out = latent.copy()
        out["samples"] = samples
        denoised = out
        if "x0" in x0_output:
            denoised = latent.copy()
            denoised["samples"] = last.model.process_latent_out(x0_output["x0"].cpu())
        return io.NodeOutput(out, denoised)


NODES = [FewStepTwoExpertSampler]
