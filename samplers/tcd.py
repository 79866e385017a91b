"""Trajectory Consistency Distillation sampling (strategic stochastic sampling), diffusers-``TCDScheduler``-exact.

Zheng et al. 2024, "Trajectory Consistency Distillation" (arXiv 2402.19159). gamma (diffusers ``eta``) sets how
far back along the trajectory each step jumps before re-noising: s = floor((1 - gamma) * t_next). gamma = 0 is
deterministic DDIM, gamma = 1 is LCM-like. Note diffusers' SD pipelines pass eta = 0 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .consistency import sample_consistency

__all__ = ["TCD_STEP", "sample_tcd"]

#: The consistency-step switches that make it TCD; gamma is the caller's (shared with the node layer).
TCD_STEP = dict(boundary=False, clean_intermediate=False)


def sample_tcd(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    *,
    gamma: float = 0.3,
    final_step: str = "x0",
    noise_sampler: Callable | None = None,
    noise_sampler_factory: Callable | None = None,
    model_sampling=None,
) -> torch.Tensor:
    """k-diffusion TCD sampler: ``sample_consistency`` without boundary condition.

    Args:
        gamma: TCD gamma in [0, 1] (0.3 is the TCD card default; Hyper-SD unified 1-step uses 1.0).
        final_step: ``"x0"`` for a clean result, ``"diffusers"`` for diffusers' x_s at t=0 (keeps ~0.029 eps).
        Other arguments as in ``samplers.consistency.sample_consistency``.
    """
    return sample_consistency(
        model, x, sigmas, extra_args, callback, disable, gamma=gamma, final_step=final_step, **TCD_STEP,
        noise_sampler=noise_sampler, noise_sampler_factory=noise_sampler_factory,
        model_sampling=model_sampling,
    )
