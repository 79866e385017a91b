"""The one few-step step and its one coefficient builder (LCM, TCD, DDIM/Euler and PCM are special cases).

For step ``i``, with the model's x0 prediction ``D_raw`` and fresh unit noise ``z``:

    D      = c_out * D_raw + c_skipv * x            (LCM boundary condition; c_out = 1, c_skipv = 0 without it)
    x_s    = r * x + (1 - r) * D,   r = sigma_s / sigma_i        (the deterministic jump to sigma_s)
    x_next = scale * x_s + noise * z                              (re-noise to sigma_{i+1})

so ``x_next = a_x*x + a_d*D_raw + a_z*z`` and the preview ``x0 = b_x*x + b_d*D_raw`` with

    a_x = scale * (r + (1 - r) * c_skipv),  a_d = scale * (1 - r) * c_out,  a_z = noise,  b_x = c_skipv,  b_d = c_out.

``sigma_s``, ``scale`` and ``noise`` come from the model's parametrisation (``samplers.parametrisation``), the rest
from the sampler's switches (``Step``). gamma = 0 is DDIM / Euler, gamma = 1 with clean_intermediate is LCM (Luo et
al. 2023), values between are TCD (Zheng et al. 2024). On the grid of the diffusers schedulers this reproduces
``LCMScheduler`` / ``TCDScheduler.step`` exactly. The unfused loop (``samplers.consistency``) and the fused kernel
(``kernels``, columns in ``kernels.consistency_step.COEFF_FIELDS`` order) both consume ``step_coefficients``' table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .parametrisation import FINAL_STEPS

__all__ = ["Step", "StepCoefficients", "step_coefficients", "check_gamma"]


def check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    return float(gamma)


@dataclass(frozen=True)
class Step:
    """A sampler's switches: ``gamma`` (TCD stochasticity in [0, 1]: 0 = DDIM/Euler, 1 = full re-noise),
    ``boundary`` (the LCM c_skip/c_out boundary condition), ``clean_intermediate`` (re-noise D itself, sigma_s = 0:
    diffusers ``LCMScheduler``)."""

    gamma: float = 0.0
    boundary: bool = False
    clean_intermediate: bool = False

    def __post_init__(self):
        check_gamma(self.gamma)


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step scalars for a whole sigma sequence; every field is a CPU float64 tensor of length ``n_steps``.

    The step: ``a_x, a_d, a_z`` (``x_next = a_x*x + a_d*D_raw + a_z*z``) and ``b_x, b_d`` (``x0 = b_x*x +
    b_d*D_raw``, the preview). How they were made: ``sigma`` (sigma_i), ``sigma_next``, ``t`` (timestep of sigma_i),
    ``t_next`` (0 on a final sigma of 0), ``s`` (target timestep), ``sigma_s`` (noise level of x_s), ``c_skip`` /
    ``c_out`` (boundary condition; 0 / 1 without it), ``scale`` (the re-noise factor on x_s).
    """

    a_x: torch.Tensor
    a_d: torch.Tensor
    a_z: torch.Tensor
    b_x: torch.Tensor
    b_d: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    s: torch.Tensor
    sigma_s: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    scale: torch.Tensor


def _check_sigmas(sigmas) -> torch.Tensor:
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got {sigmas!r}")
    sig = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(sig).all()):
        raise ValueError(f"sigmas must be finite, got {sig.tolist()}")
    if not bool((sig[1:] < sig[:-1]).all()) or not bool((sig[:-1] > 0).all()) or bool(sig[-1] < 0):
        raise ValueError("sigmas must be strictly decreasing and positive (only the last may be 0), "
                         f"got {sig.tolist()}")
    return sig


def step_coefficients(sigmas: torch.Tensor, param, step: Step, final_step: str = "x0") -> StepCoefficients:
    """All per-step coefficients of a run in one vectorised pass on the CPU (float64).

    Args:
        sigmas: k-diffusion SIGMAS, 1-D, strictly decreasing, positive except possibly a final 0. A schedule that
            ends above 0 (SplitSigmas) re-noises on its last step too.
        param: the model's parametrisation record (``samplers.parametrisation.parametrisation(model_sampling)``).
        step: the sampler's switches.
        final_step: ``"x0"`` returns D on a step to sigma 0; ``"diffusers"`` returns diffusers' output there
            (TCD: the VP x_s at s = 0; LCM / clean_intermediate: D, the same as ``"x0"``).
    """
    sig = _check_sigmas(sigmas)
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    s_i, s_n = sig[:-1], sig[1:]
    tg = param.targets(s_i, s_n, step, final_step)
    scale, noise = param.renoise(tg.sigma_s, s_n)
    if step.boundary:
        c_skip, c_skipv, c_out = param.boundary(tg.t, s_i)
    else:
        c_skip, c_skipv, c_out = torch.zeros_like(s_i), torch.zeros_like(s_i), torch.ones_like(s_i)
    r = tg.sigma_s / s_i
    return StepCoefficients(
        a_x=scale * (r + (1.0 - r) * c_skipv), a_d=scale * (1.0 - r) * c_out, a_z=noise, b_x=c_skipv, b_d=c_out,
        sigma=s_i, sigma_next=s_n, t=tg.t, t_next=tg.t_next, s=tg.s, sigma_s=tg.sigma_s, c_skip=c_skip, c_out=c_out,
        scale=scale,
    )
