"""Latent Consistency Model sampling, diffusers-``LCMScheduler``-exact.

Luo et al. 2023, "Latent Consistency Models" (arXiv 2310.04378); LCM-LoRA: Luo et al. 2023 (arXiv 2311.05556).
Each step predicts x0 with the LCM boundary condition, then re-noises that x0 to the next sigma:
``x_{i+1} = D + sigma_{i+1} * z``. Use with ``schedules.lcm_timesteps`` sigmas for diffusers-exact trajectories.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .consistency import sample_consistency

__all__ = ["LCM_STEP", "sample_lcm_exact"]

#: The consistency-step switches that make it LCM (shared with the node layer).
LCM_STEP = dict(gamma=1.0, boundary=True, clean_intermediate=True)


def sample_lcm_exact(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    *,
    noise_sampler: Callable | None = None,
    noise_sampler_factory: Callable | None = None,
    model_sampling=None,
) -> torch.Tensor:
    """k-diffusion LCM sampler: ``sample_consistency`` with gamma=1, boundary=True, clean_intermediate=True.

    The last step returns the clean x0 (which is also what diffusers returns). Arguments as in
    ``samplers.consistency.sample_consistency``.
    """
    return sample_consistency(
        model, x, sigmas, extra_args, callback, disable, final_step="x0", **LCM_STEP, noise_sampler=noise_sampler, noise_sampler_factory=noise_sampler_factory,
        model_sampling=model_sampling,
    )
