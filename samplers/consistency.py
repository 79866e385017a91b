"""The general consistency-model step in k-diffusion sigma space (LCM, TCD, DDIM/Euler, PCM are special cases).

k-diffusion VE space as in ComfyUI: ``x = x0 + sigma * eps``; the model returns the x0 prediction ``D``.
The VP sample of diffusers is ``x_vp = x / sqrt(1 + sigma^2)`` and ``abar = 1 / (1 + sigma^2)`` (always from
sigma, never from an ``alphas_cumprod`` buffer). For step ``i``:

    D      = model(x, sigma_i)                      optionally the LCM boundary condition, see below
    eps    = (x - D) / sigma_i
    t'     = timestep(sigma_{i+1})                  (0 when sigma_{i+1} = 0)
    s      = floor((1 - gamma) * t'),  sigma_s = sigma(s)   (sigma_s = 0 with clean_intermediate: LCM)
    x_s    = D + sigma_s * eps
    x_next = x_s + sqrt(sigma_{i+1}^2 - sigma_s^2) * z

gamma = 0 is DDIM / Euler, gamma = 1 with clean_intermediate is LCM (Luo et al. 2023), values between are TCD
(Zheng et al. 2024). On the grid of the diffusers schedulers this reproduces ``LCMScheduler`` /
``TCDScheduler.step`` exactly. When ``s == t'`` (gamma = 0 or tiny) ``sigma_s`` is ``sigma_{i+1}`` itself, and
otherwise ``sigma_s`` is capped at ``sigma_{i+1}``, so off-grid sigmas (karras, split...) still step sensibly.

LCM boundary condition (``boundary=True``): with ``t = timestep(sigma_i)``, ``c_skip = sd^2 / ((10t)^2 + sd^2)``,
``c_out = 10t / sqrt((10t)^2 + sd^2)``, ``sd = 0.5``, ``D <- c_out * D + c_skip * x_vp``. diffusers applies
``c_skip`` to the VP sample (``x_vp = x / sqrt(1 + sigma_i^2)``), which we follow; ComfyUI's ``LCM`` model
sampling applies it to the VE ``x``. Both are numerically ~identity for SD (c_skip <= 7e-6).

Every step is linear in ``(x, D_raw, z)`` (``linear_step_coefficients``); the loop uses exactly that form,
``x_next = a_x x + a_d D_raw + a_z z`` and ``denoised = b_x x + b_d D_raw``, which a fused kernel can share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable

import torch
from tqdm.auto import trange

from .discrete import BETA_SCHEDULES, DiscreteSchedule
from .noise import default_noise_sampler

__all__ = [
    "FINAL_STEPS",
    "COEFF_FIELDS",
    "StepCoefficients",
    "LinearStepCoefficients",
    "resolve_model_sampling",
    "step_coefficients",
    "linear_step_coefficients",
    "sample_consistency",
]

log = logging.getLogger("fewstep")

FINAL_STEPS = ("x0", "diffusers")
#: Column order of ``LinearStepCoefficients.as_tensor()`` (same as ``kernels.coefficients.COEFF_FIELDS``).
COEFF_FIELDS = ("a_x", "a_d", "a_z", "b_x", "b_d")
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
_UNSUPPORTED_MARKERS = ("Flow", "CONST", "EDM", "Continuous")


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step scalars for a whole sigma sequence; every field is a CPU float64 tensor of length ``n_steps``.

    Fields: ``sigma`` (sigma_i), ``sigma_next``, ``t`` (timestep of sigma_i), ``t_next`` (t', 0 on a final
    sigma of 0), ``s`` (target timestep), ``sigma_s`` (sigma of x_s; on a final step: 0 for ``final_step="x0"``,
    the diffusers value otherwise), ``ratio`` (sigma_s / sigma_i), ``noise`` (coefficient of z, 0 on a final
    step), ``c_skip``/``c_out`` (boundary condition; 0/1 without it), ``c_skipv`` (c_skip / sqrt(1+sigma_i^2),
    the factor on the VE x), ``scale`` (1, or the VP factor 1/sqrt(1+sigma_s^2) on a diffusers final step).
    """

    sigma: torch.Tensor
    sigma_next: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    s: torch.Tensor
    sigma_s: torch.Tensor
    ratio: torch.Tensor
    noise: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_skipv: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class LinearStepCoefficients:
    """``x_next = a_x*x + a_d*D_raw + a_z*z`` and ``denoised = b_x*x + b_d*D_raw``; CPU float64 ``[n_steps]`` each."""

    a_x: torch.Tensor
    a_d: torch.Tensor
    a_z: torch.Tensor
    b_x: torch.Tensor
    b_d: torch.Tensor

    def as_tensor(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[n_steps, 5]`` in ``COEFF_FIELDS`` order, for the fused kernel."""
        return torch.stack([getattr(self, f) for f in COEFF_FIELDS], dim=1).to(device=device, dtype=dtype).contiguous()


def resolve_model_sampling(model, model_sampling=None):
    """Return a discrete VP ``model_sampling``: the given one, else ``model.inner_model.inner_model.model_sampling``.

    Raises ``ValueError`` if none is found, or if it is flow matching / CONST / EDM / continuous (those have no
    discrete VP timestep table that ``timestep``/``sigma`` index).
    """
    ms = model_sampling
    if ms is None:
        try:
            ms = model.inner_model.inner_model.model_sampling
        except AttributeError:
            raise ValueError(
                f"model: cannot find model_sampling on {type(model).__name__} (expected "
                "model.inner_model.inner_model.model_sampling, as the host wraps it); pass model_sampling= explicitly"
            ) from None
    names = [c.__name__ for c in type(ms).__mro__]
    table = getattr(ms, "sigmas", None)
    if (
        any(m in n for n in names for m in _UNSUPPORTED_MARKERS)
        or not callable(getattr(ms, "sigma", None))
        or not callable(getattr(ms, "timestep", None))
        or not torch.is_tensor(table)
        or table.numel() < 2
    ):
        raise ValueError(f"fewstep consistency samplers need a discrete VP (eps/v/x0) model; got {type(ms)}")
    return ms


def _check_sigmas(sigmas) -> torch.Tensor:
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got {sigmas!r}")
    sig = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(sig).all()):
        raise ValueError(f"sigmas must be finite, got {sig.tolist()}")
    if not bool((sig[1:] < sig[:-1]).all()) or not bool((sig[:-1] > 0).all()) or bool(sig[-1] < 0):
        raise ValueError(f"sigmas must be strictly decreasing and positive (only the last may be 0), got {sig.tolist()}")
    return sig


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    return float(gamma)


def _ms_call(fn, values: torch.Tensor) -> torch.Tensor:
    return fn(values).detach().to("cpu", torch.float64).reshape(values.shape)


def _target_sigma_fn(model_sampling) -> tuple[Callable, bool]:
    """(``sigma(s)`` for a step's target timestep s, whether it reads the model's full table).

    A distilled (LCM) table -- core ``ModelSamplingDiscrete(lcm)``, AnimateDiff-Evolved's ``lcm`` schedules -- keeps
    only the 50 grid timesteps (t = k*skip + skip-1), so an off-grid s (TCD's floor((1-gamma)t'), the diffusers
    final step's s = 0) would be interpolated or clamped, while diffusers reads its full alpha-bar table there. The
    full table is rebuilt from the schedule's parameters and used when it reproduces every kept point; else
    ``(model_sampling.sigma, False)``.
    """
    table = getattr(model_sampling, "sigmas", None)
    n = getattr(model_sampling, "num_timesteps", None)
    if not isinstance(n, int) or not torch.is_tensor(table) or not 1 < table.numel() < n:
        return model_sampling.sigma, True
    kept = table.detach().to("cpu", torch.float64)
    skip = n // kept.numel()
    at = torch.arange(kept.numel()) * skip + (skip - 1)
    for schedule in BETA_SCHEDULES:
        try:
            full = DiscreteSchedule(schedule, float(model_sampling.linear_start), float(model_sampling.linear_end), n,
                                    dtype=torch.float64)
        except (AttributeError, TypeError, ValueError):
            break
        if torch.allclose(full.sigmas[at], kept, rtol=1e-4, atol=0.0):
            return full.sigma, True
    return model_sampling.sigma, False


def step_coefficients(
    sigmas: torch.Tensor,
    model_sampling,
    gamma: float = 0.3,
    boundary: bool = False,
    clean_intermediate: bool = False,
    final_step: str = "x0",
) -> StepCoefficients:
    """All per-step scalars of ``sample_consistency`` in one vectorised pass on the CPU (float64).

    Args:
        sigmas: k-diffusion SIGMAS, 1-D, strictly decreasing, positive except possibly a final 0.
        model_sampling: duck-typed ``.timestep(sigma)`` / ``.sigma(t)`` (host object or ``DiscreteSchedule``).
        gamma: TCD stochasticity in [0, 1] (0 = DDIM/Euler, 1 = full re-noise).
        boundary: apply the LCM c_skip/c_out boundary condition.
        clean_intermediate: re-noise from D itself (sigma_s = 0; diffusers ``LCMScheduler`` semantics).
        final_step: ``"x0"`` returns D on a step to sigma 0; ``"diffusers"`` returns diffusers' output there
            (TCD: the VP x_s at s = 0; LCM / clean_intermediate: D).
    """
    sig = _check_sigmas(sigmas)
    gamma = _check_gamma(gamma)
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    s_i, s_n = sig[:-1], sig[1:]
    final = s_n == 0
    t = _ms_call(model_sampling.timestep, s_i)
    t_next = torch.where(final, 0.0, _ms_call(model_sampling.timestep, torch.where(final, s_i, s_n)))
    s = torch.floor((1.0 - gamma) * t_next)
    target_sigma, exact = _target_sigma_fn(model_sampling)
    if not exact and final_step == "diffusers" and bool(final.any()):
        raise ValueError("final_step='diffusers' needs the noise level at timestep 0, which this model's distilled "
                         "(LCM) sigma table does not hold; use final_step='x0', or remove the "
                         "ModelSamplingDiscrete(lcm) / LCM beta-schedule node (fewstep's schedules need none)")
    sigma_of_s = _ms_call(target_sigma, s)
    sigma_s = torch.where(s >= t_next, s_n, torch.minimum(sigma_of_s, s_n))
    sigma_s = torch.where(final, sigma_of_s if final_step == "diffusers" else 0.0, sigma_s)
    if clean_intermediate:
        sigma_s = torch.zeros_like(sigma_s)
    noise = torch.where(final, 0.0, (s_n * s_n - sigma_s * sigma_s).clamp(min=0.0).sqrt())
    scale = torch.where(final, 1.0 / (1.0 + sigma_s * sigma_s).sqrt(), 1.0)
    if boundary:
        scaled = TIMESTEP_SCALING * t
        c_skip = SIGMA_DATA**2 / (scaled * scaled + SIGMA_DATA**2)
        c_out = scaled / (scaled * scaled + SIGMA_DATA**2).sqrt()
    else:
        c_skip, c_out = torch.zeros_like(t), torch.ones_like(t)
    return StepCoefficients(
        sigma=s_i, sigma_next=s_n, t=t, t_next=t_next, s=s, sigma_s=sigma_s, ratio=sigma_s / s_i, noise=noise,
        c_skip=c_skip, c_out=c_out, c_skipv=c_skip / (1.0 + s_i * s_i).sqrt(), scale=scale,
    )


def linear_step_coefficients(coeffs: StepCoefficients) -> LinearStepCoefficients:
    """Fold ``coeffs`` into ``x_next = a_x*x + a_d*D_raw + a_z*z`` and ``denoised = b_x*x + b_d*D_raw``.

    With ``r = sigma_s / sigma_i``: ``a_x = scale*(r + (1-r)*c_skipv)``, ``a_d = scale*(1-r)*c_out``,
    ``a_z = noise``, ``b_x = c_skipv``, ``b_d = c_out``.
    """
    r = coeffs.ratio
    return LinearStepCoefficients(
        a_x=coeffs.scale * (r + (1.0 - r) * coeffs.c_skipv),
        a_d=coeffs.scale * (1.0 - r) * coeffs.c_out,
        a_z=coeffs.noise.clone(),
        b_x=coeffs.c_skipv.clone(),
        b_d=coeffs.c_out.clone(),
    )


@torch.no_grad()
def sample_consistency(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    *,
    gamma: float = 0.3,
    boundary: bool = False,
    final_step: str = "x0",
    clean_intermediate: bool = False,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    noise_sampler_factory: Callable[[torch.Tensor, int | None], Callable] | None = None,
    model_sampling=None,
) -> torch.Tensor:
    """k-diffusion sampler: the general consistency step (see module docstring) over ``sigmas``.

    Args:
        model: k-diffusion denoiser ``model(x, sigma * s_in, **extra_args) -> x0`` (VE space).
        x: initial latent, already scaled to ``sigmas[0]`` (``x = latent + sigmas[0] * noise``).
        sigmas: SIGMAS (strictly decreasing; only the last may be 0). Fewer than 2 entries return ``x``.
        extra_args: passed to the model; ``extra_args["seed"]`` seeds the default step noise.
        callback: called every step with ``{'x','i','sigma','sigma_hat','denoised'}``; ``denoised`` is always D.
        disable: disables the tqdm progress bar.
        gamma: stochasticity in [0, 1].
        boundary: apply the LCM boundary condition to D.
        final_step: ``"x0"`` (clean D) or ``"diffusers"`` (what diffusers returns) on the step to sigma 0.
        clean_intermediate: sigma_s = 0 (diffusers LCM: re-noise D itself).
        noise_sampler: ``(sigma, sigma_next) -> z``; drawn only on steps with a non-zero noise coefficient.
        noise_sampler_factory: ``(x, seed) -> noise_sampler`` consulted at call time when ``noise_sampler`` is
            None (the node layer passes one that honours the host's ``default_noise_sampler`` patches);
            default ``samplers.noise.default_noise_sampler`` (per (seed, batch index) CPU generators).
        model_sampling: duck-typed model sampling; default ``model.inner_model.inner_model.model_sampling``.
    """
    extra_args = {} if extra_args is None else extra_args
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() < 2:
        return x
    ms = resolve_model_sampling(model, model_sampling)
    coeffs = step_coefficients(sigmas, ms, gamma, boundary, clean_intermediate, final_step)
    lin = linear_step_coefficients(coeffs)
    a_x, a_d, a_z, b_x, b_d = (getattr(lin, f).tolist() for f in COEFF_FIELDS)
    log.debug("fewstep consistency: t=%s s=%s sigma_s=%s noise=%s", coeffs.t.tolist(), coeffs.s.tolist(),
              coeffs.sigma_s.tolist(), a_z)
    if noise_sampler is None and any(c > 0 for c in a_z):
        noise_sampler = (noise_sampler_factory or default_noise_sampler)(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(a_x), disable=disable):
        d_raw = model(x, sigmas[i] * s_in, **extra_args)
        denoised = b_x[i] * x + b_d[i] * d_raw if boundary else d_raw
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x_next = a_x[i] * x + a_d[i] * d_raw
        if a_z[i] > 0:
            x_next = x_next + a_z[i] * noise_sampler(sigmas[i], sigmas[i + 1])
        x = x_next
    return x
