"""Glue between the host's sampling machinery and the pack's math: one sampler function for every entry point.

`fewstep_sample` is the k-diffusion sampler behind the SAMPLER nodes (through ``comfy.samplers.KSAMPLER``)
and behind the KSampler dropdown names (through the registry). It resolves settings in this order:
SAMPLER-node options, then the FewStep Settings model patch (``model_options["transformer_options"]["fewstep"]``,
read at sample time), then the sampler kind's defaults.
"""
from __future__ import annotations

import logging

import comfy.k_diffusion.sampling as ksampling
import comfy.samplers

from ..samplers import consistency
from ..samplers.lcm import LCM_STEP
from ..samplers.noise import BatchStepNoise
from ..samplers.pcm import PCM_STEP
from ..samplers.tcd import TCD_STEP

log = logging.getLogger("fewstep")

SETTINGS_KEY = "fewstep"
NOISE_DEVICES = ("cpu", "gpu")
FUSED_MODES = ("auto", "on", "off")

# kind -> fixed step parameters; gamma for "tcd"/"consistency" comes from options.
# The named samplers' own switches (samplers/lcm.py, tcd.py, pcm.py): one definition for both entry points.
# "ddim" (Hyper-SD / Lightning presets: Euler/DDIM on trailing timesteps) is the same deterministic step as PCM.
KIND_PARAMS = {"lcm": LCM_STEP, "tcd": TCD_STEP, "pcm": PCM_STEP, "ddim": PCM_STEP, "consistency": {}}
DEFAULTS = dict(gamma=0.3, boundary=False, clean_intermediate=False, final_step="x0", noise_device="cpu",
                batch_offset=0, fused="auto")

# Captured when the pack registers, before any sampling: if AnimateDiff-Evolved (or anything else) swaps
# `default_noise_sampler` during a run, the pack follows it, as core samplers do.
_CORE_DEFAULT_NOISE_SAMPLER = ksampling.default_noise_sampler


def settings_from_model(extra_args: dict) -> dict:
    opts = (extra_args or {}).get("model_options", {}).get("transformer_options", {})
    return dict(opts.get(SETTINGS_KEY, {}))


def resolve_options(kind: str, node_options: dict, extra_args: dict) -> dict:
    if kind not in KIND_PARAMS:
        raise ValueError(f"fewstep: unknown sampler kind {kind!r}; choose from {sorted(KIND_PARAMS)}")
    opts = dict(DEFAULTS)
    patch = settings_from_model(extra_args)
    opts.update({k: v for k, v in patch.items() if k in DEFAULTS})
    opts.update({k: v for k, v in node_options.items() if v is not None})
    opts.update(KIND_PARAMS[kind])
    if not 0.0 <= float(opts["gamma"]) <= 1.0:
        raise ValueError(f"fewstep {kind} sampler: gamma must be in [0, 1], got {opts['gamma']}")
    if opts["final_step"] not in consistency.FINAL_STEPS:
        raise ValueError(f"fewstep {kind} sampler: final_step must be one of {consistency.FINAL_STEPS}")
    if opts["noise_device"] not in NOISE_DEVICES:
        raise ValueError(f"fewstep {kind} sampler: noise_device must be one of {NOISE_DEVICES}")
    if opts["fused"] not in FUSED_MODES:
        raise ValueError(f"fewstep {kind} sampler: fused must be one of {FUSED_MODES}")
    return opts


def noise_factory(batch_offset: int, noise_device: str):
    """Step-noise source, looked up at call time: a patched host default wins, else per-(seed, index) noise."""
    def factory(x, seed):
        patched = ksampling.default_noise_sampler
        if patched is not _CORE_DEFAULT_NOISE_SAMPLER:
            return patched(x, seed=seed)
        return BatchStepNoise(x, 0 if seed is None else int(seed), batch_offset=int(batch_offset),
                              cpu=(noise_device == "cpu"))
    return factory


def use_fused(mode: str, x) -> bool:
    if mode == "off":
        return False
    from ..kernels import consistency_step
    if not x.is_cuda:
        why = f"the latent is on {x.device}, and the fused kernel runs on CUDA"
    elif not consistency_step.triton_available():
        why = "triton cannot be imported in this Python (pip install triton, or triton-windows on Windows)"
    else:
        return True
    if mode == "on":
        raise ValueError(f"fewstep sampler: fused=on, but {why}; set fused to auto or off")
    if x.is_cuda:  # auto on a GPU without triton: say once why it is the unfused loop
        from .graphs import log_once
        log_once(f"sampler fused=auto runs the unfused loop: {why}")
    return False



def fewstep_sample(model, x, sigmas, extra_args=None, callback=None, disable=None, *, kind="consistency", **node_options):
    """k-diffusion sampler entry point shared by every fewstep SAMPLER and dropdown name."""
    extra_args = {} if extra_args is None else extra_args
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"fewstep {kind} sampler: the sigmas input has {sigmas.numel()} value(s); at least 2 (one "
                         "step) are needed. Check the SIGMAS wired into the sampler (e.g. a SplitSigmas at the end).")
    opts = resolve_options(kind, node_options, extra_args)
    factory = noise_factory(opts["batch_offset"], opts["noise_device"])
    step = dict(gamma=float(opts["gamma"]), boundary=bool(opts["boundary"]), final_step=opts["final_step"],
                clean_intermediate=bool(opts["clean_intermediate"]))
    if use_fused(opts["fused"], x):
        return sample_fused(model, x, sigmas, extra_args, callback, disable, factory, **step)
    return consistency.sample_consistency(model, x, sigmas, extra_args, callback, disable,
                                          noise_sampler_factory=factory, **step)


def sample_fused(model, x, sigmas, extra_args, callback, disable, factory, **step):
    """The fused path: coefficients on the device and all step noise drawn before the loop, in the same order as
    the unfused loop draws it, so a seed gives the same image either way."""
    import torch

    from ..kernels.loop import sample_fused as fused_loop
    from .graphs import with_graph_capture

    ms = consistency.resolve_model_sampling(model)
    lin = consistency.linear_step_coefficients(consistency.step_coefficients(sigmas, ms, **step))
    a_z = lin.a_z.tolist()
    noise = None
    noisy = [i for i, c in enumerate(a_z) if c > 0]
    if noisy:
        sampler = factory(x, extra_args.get("seed"))
        if isinstance(sampler, BatchStepNoise):
            drawn = sampler.pre_draw(len(noisy))  # one host->device copy for the whole run
        else:
            drawn = torch.stack([sampler(sigmas[i], sigmas[i + 1]) for i in noisy])
        # Row i feeds step i. A run to sigma 0 has a noiseless last step: leave its row out (the loop then reads
        # no noise there). A split schedule (SplitSigmas, ending above 0) re-noises on its last step too.
        rows = len(a_z) if a_z[-1] > 0 else len(a_z) - 1
        noise = x.new_zeros((rows, *x.shape))
        noise[noisy] = drawn.to(x)
    extra_args = with_graph_capture(model, x, extra_args)
    return fused_loop(model, x, sigmas, lin.as_tensor(device=x.device), noise, extra_args, callback, disable)


def make_sampler(kind: str, **options) -> comfy.samplers.KSAMPLER:
    """A SAMPLER object for SamplerCustom / SamplerCustomAdvanced."""
    return comfy.samplers.KSAMPLER(fewstep_sample, extra_options=dict(kind=kind, **options))
