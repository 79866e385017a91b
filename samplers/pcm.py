"""Deterministic DDIM jumps: Phased Consistency Models, and the Euler/DDIM step of Hyper-SD and SDXL-Lightning.

Wang et al. 2024, "Phased Consistency Model" (arXiv 2405.18407). Each PCM phase is a consistency trajectory
segment, so sampling is a deterministic DDIM step (gamma = 0) from one phase edge to the next; use
``schedules.pcm_phase_timesteps`` sigmas to land exactly on the edges the LoRA was trained for. The same step on
trailing timesteps is what the Hyper-SD N-step and SDXL-Lightning cards ask for (DDIM / Euler: one step on eps
models), so their presets name this sampler too.
"""

from __future__ import annotations

from . import consistency

__all__ = ["PCM", "sample_pcm"]

#: The switches that make the one step a deterministic DDIM jump.
PCM = dict(gamma=0.0, boundary=False, clean_intermediate=False)


def sample_pcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
    """k-diffusion PCM / DDIM sampler: gamma 0, no step noise is ever drawn. ``final_step="diffusers"`` returns the VP
    x at t=0, as a DDIM-style last step would. Options and arguments as in ``samplers.consistency.run``."""
    return consistency.run("pcm", PCM, model, x, sigmas, extra_args, callback, disable, noise_sampler, **options)
