"""Phased Consistency Model sampling: deterministic DDIM jumps between phase edges.

Wang et al. 2024, "Phased Consistency Model" (arXiv 2405.18407). Each PCM phase is a consistency trajectory
segment, so sampling is a deterministic DDIM step (gamma = 0) from one phase edge to the next; use
``schedules.pcm_phase_timesteps`` sigmas to land exactly on the edges the LoRA was trained for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .consistency import sample_consistency

__all__ = ["PCM_STEP", "sample_pcm"]

#: Deterministic DDIM jumps between phase edges (shared with the node layer).
PCM_STEP = dict(gamma=0.0, boundary=False, clean_intermediate=False)


def sample_pcm(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    *,
    final_step: str = "x0",
    model_sampling=None,
) -> torch.Tensor:
    """k-diffusion PCM sampler: ``sample_consistency`` with gamma=0 (no step noise is ever drawn).

    Args:
        final_step: ``"x0"`` (clean) or ``"diffusers"`` (VP x at t=0, as a DDIM-style last step would give).
        Other arguments as in ``samplers.consistency.sample_consistency``.
    """
    return sample_consistency(
        model, x, sigmas, extra_args, callback, disable, final_step=final_step, **PCM_STEP,
        model_sampling=model_sampling,
    )
