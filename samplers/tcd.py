"""Trajectory Consistency Distillation sampling (strategic stochastic sampling), diffusers-``TCDScheduler``-exact.

Zheng et al. 2024, "Trajectory Consistency Distillation" (arXiv 2402.19159). gamma (diffusers ``eta``) sets how
far back along the trajectory each step jumps before re-noising: s = floor((1 - gamma) * t_next). gamma = 0 is
deterministic DDIM, gamma = 1 is LCM-like. Note diffusers' SD pipelines pass eta = 0 unless told otherwise.
"""

from __future__ import annotations

from . import consistency

__all__ = ["TCD", "sample_tcd"]

#: The switches that make the one step TCD; gamma is the caller's (option, FewStep Settings, or 0.3).
TCD = dict(boundary=False, clean_intermediate=False)


def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
    """k-diffusion TCD sampler: no boundary condition, ``gamma`` in [0, 1] (0.3 is the TCD card default; Hyper-SD's
    unified 1-step uses 1.0). ``final_step="diffusers"`` returns diffusers' x_s at t=0 (keeps ~0.029 eps). Other
    options and arguments as in ``samplers.consistency.run``."""
    return consistency.run("tcd", TCD, model, x, sigmas, extra_args, callback, disable, noise_sampler, **options)
