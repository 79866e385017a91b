"""SAMPLER, SIGMAS and NOISE nodes for SamplerCustom / SamplerCustomAdvanced."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..samplers import consistency, parametrisation, schedules
from ..samplers.noise import initial_noise
from . import engine
from .common import CATEGORIES, advanced, checked, model_base
from .validate import validated

CAT_SAMPLERS = CATEGORIES["samplers"]
CAT_SCHEDULERS = CATEGORIES["schedulers"]
CAT_NOISE = CATEGORIES["noise"]


def model_sampling(node: str, model):
    """The model's model sampling (a user's ModelSampling* node included), checked: discrete VP or flow matching."""
    ms = model.get_model_object("model_sampling")
    return checked(node, parametrisation.resolve_model_sampling, None, ms)


def img2img_rule(model) -> str:
    """The img2img step rule of the model family's pipeline on flow models (Wan's video2video keeps int(n*s))."""
    return "int" if model_base(model) in ("wan", "wan22_5b") else "flow"


# ---------------------------------------------------------------- shared inputs

def gamma_input(default=0.3):
    return io.Float.Input("gamma", default=default, min=0.0, max=1.0, step=0.01,
                          tooltip="TCD stochasticity (the paper's gamma, diffusers' eta): 0 = deterministic DDIM, "
                                  "1 = LCM-like re-noising from x0. Higher gamma suits more steps.")


def common_sampler_inputs():
    """The technical options every sampler node shares, marked advanced (hidden until "Show Advanced" in the node's
    context menu): their defaults are right for almost everyone."""
    return [advanced(i) for i in (
        io.Combo.Input("final_step", options=list(parametrisation.FINAL_STEPS), default="x0",
                       tooltip="Advanced. Last step: 'x0' returns the clean prediction (right for nearly everyone); "
                               "'diffusers' returns exactly what the diffusers scheduler returns (TCD keeps a trace "
                               "of predicted noise)."),
        io.Combo.Input("noise_device", options=list(consistency.NOISE_DEVICES), default="cpu",
                       tooltip="Advanced. Where step noise is drawn. 'cpu' gives the same image for a seed on any "
                               "machine; 'gpu' matches nothing across devices but skips a copy."),
        io.Int.Input("batch_offset", default=0, min=0, max=4096,
                     tooltip="Advanced. Batch index of the first image. Step noise depends only on (seed, index): "
                             "to re-render image k of a batch alone, pick it with LatentFromBatch(k) and set this "
                             "to k."),
        io.Combo.Input("fused", options=list(consistency.FUSED_MODES), default="auto",
                       tooltip="Advanced. Fused Triton step kernel + sync-free loop: auto = on when the latent is on "
                               "CUDA and Triton is installed; on = require it; off = plain PyTorch."),
    )]


def _sampler_node(node_id, display, description, kind, extra_inputs=()):
    @validated
    class _Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, display_name=display, category=CAT_SAMPLERS, description=description,
                             inputs=[*[f() for f in extra_inputs], *common_sampler_inputs()],
                             outputs=[io.Sampler.Output()])

        @classmethod
        def execute(cls, **kw) -> io.NodeOutput:
            checked(display, consistency.resolve_options, kind, kw)
            return io.NodeOutput(engine.make_sampler(kind, **kw))

    _Node.__name__ = _Node.__qualname__ = node_id
    return _Node


FewStepSamplerLCM = _sampler_node(
    "FewStepSamplerLCM", "FewStep LCM Sampler",
    "Latent Consistency Model sampling (Luo et al. 2023; LCM-LoRA 2311.05556), diffusers-exact: x0 with the LCM "
    "boundary condition, re-noised to the next grid point. No ModelSamplingDiscrete node needed. Pair with FewStep "
    "LCM Schedule.", "lcm")
FewStepSamplerTCD = _sampler_node(
    "FewStepSamplerTCD", "FewStep TCD Sampler",
    "Trajectory Consistency Distillation sampling (Zheng et al. 2024) with gamma: a DDIM move to s = (1-gamma)*t_next "
    "then fresh seeded noise. Equals diffusers TCDScheduler. Previews show x0.", "tcd", (gamma_input,))
FewStepSamplerPCM = _sampler_node(
    "FewStepSamplerPCM", "FewStep PCM Sampler",
    "Phased Consistency Model sampling (Wang et al. 2024): deterministic DDIM jumps between phase edges. Pair with "
    "FewStep PCM Schedule (edges 999-739-499-239 for 4 phases of 50).", "pcm")


@validated
class FewStepSamplerConsistency(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepSamplerConsistency", display_name="FewStep Consistency Sampler (unified)",
            category=CAT_SAMPLERS,
            description="The one consistency step behind every fewstep sampler, with all its switches: gamma 0 = DDIM/"
                        "Euler, 0<gamma<1 = TCD, gamma 1 + clean intermediate + boundary = LCM.",
            inputs=[gamma_input(),
                    io.Boolean.Input("boundary", default=False,
                                     tooltip="Apply the LCM boundary condition (c_skip, c_out; sigma_data 0.5, "
                                             "timestep scaling 10) to the model's x0."),
                    io.Boolean.Input("clean_intermediate", default=False,
                                     tooltip="Re-noise from x0 itself (sigma_s = 0), as diffusers' LCMScheduler does."),
                    *common_sampler_inputs()],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        checked("FewStep Consistency Sampler", consistency.resolve_options, "consistency", kw)
        return io.NodeOutput(engine.make_sampler("consistency", **kw))


# ---------------------------------------------------------------- SIGMAS

def model_input():
    return io.Model.Input("model", tooltip="The model whose noise schedule (sigma table) the timesteps are placed on.")


def steps_input(name="steps", default=4, tooltip="Number of sampling steps."):
    return io.Int.Input(name, default=default, min=1, max=1000, tooltip=tooltip)


def strength_input():
    return io.Float.Input("strength", default=1.0, min=0.01, max=1.0, step=0.01,
                          tooltip="img2img strength (denoise) with diffusers' exact rule: the grid is cut at "
                                  "strength * original_steps before the steps are picked. 1.0 = text-to-image.")


def original_steps_input():
    return io.Combo.Input("original_steps", options=["50", "100", "25"], default="50",
                          tooltip="Size of the distillation grid (the scheduler's original_inference_steps "
                                  "setting): 50 for LCM-LoRA/TCD, 100 for AnimateLCM's reference config, 25 coarse.")


def _sigmas(node, model, grid, **kw):
    ms = model_sampling(node, model)
    return io.NodeOutput(checked(node, lambda: schedules.grid_sigmas(grid, ms, **kw).cpu()))


def _grid_schedule_node(node_id, display, description, grid):
    @validated
    class _Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, display_name=display, category=CAT_SCHEDULERS, description=description,
                             inputs=[model_input(), steps_input(), strength_input(), original_steps_input()],
                             outputs=[io.Sigmas.Output()])

        @classmethod
        def execute(cls, model, steps, strength, original_steps) -> io.NodeOutput:
            return _sigmas(display, model, grid, steps=steps, strength=strength, original_steps=int(original_steps))

    _Node.__name__ = _Node.__qualname__ = node_id
    return _Node


FewStepScheduleLCM = _grid_schedule_node(
    "FewStepScheduleLCM", "FewStep LCM Schedule",
    "diffusers-exact LCM skipping-step timesteps (999, 759, 499, 259 for 4 steps of 50) with exact img2img strength, "
    "as sigmas of the given model. SD-family (discrete VP) models only: on flow-matching models use FewStep "
    "Trailing or PCM Schedule.", "lcm")
FewStepScheduleTCD = _grid_schedule_node(
    "FewStepScheduleTCD", "FewStep TCD Schedule",
    "diffusers TCDScheduler timesteps (the LCM grid by default) with exact img2img strength, as sigmas of the given "
    "model. SD-family (discrete VP) models only: on flow-matching models TCD samples on the Trailing or PCM "
    "Schedule.", "tcd")


@validated
class FewStepSchedulePCM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FewStepSchedulePCM", display_name="FewStep PCM Schedule", category=CAT_SCHEDULERS,
                         description="PCM phase edges from (phases, num_ddim_timesteps): 999-739-499-239-0 for 4 "
                                     "phases of 50 (SD1.5 scripts); 40 matches the SDXL example script. On flow-"
                                     "matching models (SD3): PCM's flow grid, t = 1000/760/500/260 of the model's "
                                     "shifted sigmas for 4 phases of 50.",
                         inputs=[model_input(),
                                 steps_input("phases", 4, "Number of phases = sampling steps (the LoRA's step count)."),
                                 io.Int.Input("num_ddim_timesteps", default=50, min=2, max=1000,
                                              tooltip="DDIM timesteps used in PCM training: 50 (SD1.5), 40 (SDXL).")],
                         outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, model, phases, num_ddim_timesteps) -> io.NodeOutput:
        return _sigmas("FewStep PCM Schedule", model, "pcm", steps=phases, num_ddim_timesteps=num_ddim_timesteps)


@validated
class FewStepScheduleTrailing(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FewStepScheduleTrailing", display_name="FewStep Trailing Schedule",
                         category=CAT_SCHEDULERS,
                         description="diffusers 'trailing' timesteps (999, 749, 499, 249 for 4) as Hyper-SD, "
                                     "SDXL-Lightning and PCM model cards ask for. On flow-matching models: 1, "
                                     "1 - 1/N, ... 1/N shifted by the model's sampling (Flux, Qwen-Image, Wan "
                                     "lightx2v/Lightning, FastVideo recipes).",
                         inputs=[model_input(), steps_input(),
                                 io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                                                tooltip="img2img: keep the last int(steps*denoise) timesteps "
                                                        "(diffusers' rule).")],
                         outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, model, steps, denoise) -> io.NodeOutput:
        return _sigmas("FewStep Trailing Schedule", model, "trailing", steps=steps, strength=denoise,
                       img2img=img2img_rule(model))


@validated(timesteps=schedules.fixed_timesteps)
class FewStepScheduleFixed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FewStepScheduleFixed", display_name="FewStep Fixed Timesteps",
                         category=CAT_SCHEDULERS,
                         description="Sigmas at explicit timesteps, e.g. '800' for the Hyper-SDXL 1-step UNet. On "
                                     "flow-matching models the timesteps are sigma*1000, as the model cards print "
                                     "them (e.g. '1000, 937.5, 833.3, 625'), whatever the shift.",
                         inputs=[model_input(),
                                 io.String.Input("timesteps", default="800",
                                                 tooltip="Comma-separated decreasing timesteps: integers in [0, 999] "
                                                         "on SD models; sigma*1000 in (0, 1000] on flow models.")],
                         outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, model, timesteps) -> io.NodeOutput:
        return _sigmas("FewStep Fixed Timesteps", model, "fixed", timesteps=timesteps)


# ---------------------------------------------------------------- NOISE

class BatchIndexNoise:
    """NOISE for SamplerCustomAdvanced: image k's initial noise depends only on (seed, k)."""

    def __init__(self, seed: int):
        self.seed = seed

    def generate_noise(self, input_latent) -> torch.Tensor:
        latent = input_latent["samples"]
        return initial_noise(tuple(latent.shape), self.seed, input_latent.get("batch_index"),
                             dtype=torch.float32, device="cpu")


@validated
class FewStepNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FewStepNoise", display_name="FewStep Noise (batch-stable)", category=CAT_NOISE,
                         description="Initial noise where image k depends only on (seed, k): changing the batch size "
                                     "never changes an image, and LatentFromBatch(k) re-renders image k alone.",
                         inputs=[io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                              control_after_generate=True,
                                              tooltip="Seed for the initial noise (and, passed on, the step noise).")],
                         outputs=[io.Noise.Output()])

    @classmethod
    def execute(cls, noise_seed) -> io.NodeOutput:
        return io.NodeOutput(BatchIndexNoise(noise_seed))


NODES = [FewStepSamplerLCM, FewStepSamplerTCD, FewStepSamplerPCM, FewStepSamplerConsistency,
         FewStepScheduleLCM, FewStepScheduleTCD, FewStepSchedulePCM, FewStepScheduleTrailing, FewStepScheduleFixed,
         FewStepNoise]
