"""Latent Consistency Model sampling, diffusers-``LCMScheduler``-exact.

Luo et al. 2023, "Latent Consistency Models" (arXiv 2310.04378); LCM-LoRA: Luo et al. 2023 (arXiv 2311.05556).
Each step predicts x0 with the LCM boundary condition, then re-noises that x0 to the next sigma:
``x_{i+1} = D + sigma_{i+1} * z``. Use with ``schedules.lcm_timesteps`` sigmas for diffusers-exact trajectories.
"""

from __future__ import annotations

from . import consistency

__all__ = ["LCM", "sample_lcm"]

#: The switches that make the one step LCM.
LCM = dict(gamma=1.0, boundary=True, clean_intermediate=True)


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
    """k-diffusion LCM sampler (gamma 1, boundary condition, clean intermediate). The last step returns the clean
    x0, which is also what diffusers returns, whatever ``final_step`` says. Options and arguments as in
    ``samplers.consistency.run``."""
    return consistency.run("lcm", LCM, model, x, sigmas, extra_args, callback, disable, noise_sampler, **options)
