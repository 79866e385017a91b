"""The model's noise parametrisation: the one place where a model family enters the few-step step.

Every fewstep sampler takes one step that is linear in (x, the model's x0 ``D``, fresh noise ``z``); see
``samplers.step``. To turn the sampler's switches (gamma, boundary condition, clean intermediate) into numbers, the
step needs three facts about the model and nothing else:

* ``targets``: the timesteps of the step's noise levels, and the noise level ``sigma_s`` of the deterministic jump
  ``x_s = r*x + (1-r)*D`` with ``r = sigma_s / sigma_i`` (TCD: ``s = floor((1 - gamma) * t_next)``);
* ``renoise``: how ``x_s`` reaches the next noise level, ``x_next = scale * x_s + noise * z``;
* ``boundary``: the LCM boundary condition's ``c_skip`` / ``c_out``.

``DiscreteVP`` is the discrete VP family (SD1.5, SD2, SDXL; eps, v and x0 prediction) in ComfyUI's VE sigma space,
``x = x0 + sigma * eps``. A flow-matching (CONST) family, ``x = (1 - sigma) * x0 + sigma * eps``, is one more
class with the same three methods (its jump is the same ``r*x + (1-r)*D``; its re-noise has ``scale = (1 -
sigma_next) / (1 - sigma_s)``) and one more case in ``parametrisation``.

The model sampling object is duck-typed (``.timestep(sigma)``, ``.sigma(t)``, ``.sigmas``): the host's, or
``samplers.discrete.DiscreteSchedule``. Nothing here imports ``comfy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from collections.abc import Callable

import torch

from .discrete import BETA_SCHEDULES, DiscreteSchedule

__all__ = ["FINAL_STEPS", "Targets", "DiscreteVP", "resolve_model_sampling", "parametrisation"]

#: What a step to sigma 0 returns: the clean x0, or exactly what the diffusers scheduler returns.
FINAL_STEPS = ("x0", "diffusers")
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
_UNSUPPORTED_MARKERS = ("Flow", "CONST", "EDM", "Continuous")


@dataclass(frozen=True)
class Targets:
    """Per-step timesteps and jump target, CPU float64 ``[n_steps]`` each: ``t`` (of sigma_i), ``t_next`` (of
    sigma_{i+1}; 0 on a final sigma of 0), ``s`` (the target timestep), ``sigma_s`` (the jump's noise level)."""

    t: torch.Tensor
    t_next: torch.Tensor
    s: torch.Tensor
    sigma_s: torch.Tensor


def _call(fn, values: torch.Tensor) -> torch.Tensor:
    return fn(values).detach().to("cpu", torch.float64).reshape(values.shape)


@dataclass(frozen=True)
class DiscreteVP:
    """Discrete VP noise schedule in VE space: ``x = x0 + sigma*eps``, sampled at integer training timesteps.

    Fields (host facts, as values): ``timestep`` (sigma -> timestep, the model's own map), ``sigma`` (timestep ->
    sigma on the full alpha-bar table, which diffusers reads at off-grid targets), ``full_table`` (False when the
    model carries a distilled table whose full one could not be rebuilt: ``sigma`` then interpolates the kept points).
    """

    timestep: Callable[[torch.Tensor], torch.Tensor]
    sigma: Callable[[torch.Tensor], torch.Tensor]
    full_table: bool = True
    name: ClassVar[str] = "discrete VP"

    def targets(self, sigma: torch.Tensor, sigma_next: torch.Tensor, step, final_step: str) -> Targets:
        """TCD's target: ``s = floor((1 - gamma) * t_next)``, ``sigma_s = sigma(s)`` capped at ``sigma_next`` (equal to
        it when ``s == t_next``, so off-grid schedules step sensibly). On a step to sigma 0: ``sigma_s = 0``
        (``final_step="x0"``) or ``sigma(s)`` (``"diffusers"``). ``step.clean_intermediate``: ``sigma_s = 0`` (LCM)."""
        final = sigma_next == 0
        t = _call(self.timestep, sigma)
        t_next = torch.where(final, 0.0, _call(self.timestep, torch.where(final, sigma, sigma_next)))
        s = torch.floor((1.0 - step.gamma) * t_next)
        if step.clean_intermediate:  # diffusers' LCMScheduler re-noises D itself, on every step and the last
            return Targets(t, t_next, s, torch.zeros_like(sigma))
        diffusers_final = final_step == "diffusers" and bool(final.any())
        if diffusers_final and not self.full_table:
            raise ValueError("final_step='diffusers' needs the noise level at timestep 0, which this model's distilled "
                             "(LCM) sigma table does not hold; use final_step='x0', or remove the "
                             "ModelSamplingDiscrete(lcm) / LCM beta-schedule node (fewstep's schedules need none)")
        sigma_of_s = _call(self.sigma, s)
        sigma_s = torch.where(s >= t_next, sigma_next, torch.minimum(sigma_of_s, sigma_next))
        sigma_s = torch.where(final, sigma_of_s if diffusers_final else 0.0, sigma_s)
        return Targets(t, t_next, s, sigma_s)

    def renoise(self, sigma_s: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, noise)``: ``x_next = x_s + sqrt(sigma_next^2 - sigma_s^2) * z``; a step to sigma 0 adds no noise
        and returns the VP sample ``x_s / sqrt(1 + sigma_s^2)`` (diffusers' output; ``x_s = D`` when sigma_s = 0)."""
        final = sigma_next == 0
        noise = torch.where(final, 0.0, (sigma_next * sigma_next - sigma_s * sigma_s).clamp(min=0.0).sqrt())
        scale = torch.where(final, 1.0 / (1.0 + sigma_s * sigma_s).sqrt(), 1.0)
        return scale, noise

    def boundary(self, t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LCM boundary condition (Luo et al. 2023): ``c_skip = sd^2 / ((10t)^2 + sd^2)``, ``c_out = 10t /
        sqrt((10t)^2 + sd^2)``, ``sd = 0.5``, applied as ``D = c_out*D_raw + c_skip*x_vp``. diffusers applies c_skip to
        the VP sample ``x / sqrt(1 + sigma^2)``, which this follows (ComfyUI's LCM model sampling applies it to the VE
        x; both are ~identity for SD, c_skip <= 7e-6). Returns ``(c_skip, c_skipv, c_out)``, ``c_skipv`` being the
        factor on the VE x."""
        scaled = TIMESTEP_SCALING * t
        c_skip = SIGMA_DATA**2 / (scaled * scaled + SIGMA_DATA**2)
        c_out = scaled / (scaled * scaled + SIGMA_DATA**2).sqrt()
        return c_skip, c_skip / (1.0 + sigma * sigma).sqrt(), c_out


def resolve_model_sampling(model, model_sampling=None):
    """The discrete VP ``model_sampling``: the given one, else ``model.inner_model.inner_model.model_sampling``.

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


def _full_sigma(model_sampling) -> tuple[Callable, bool]:
    """(``sigma(t)`` on the full table, whether it is the full one).

    A distilled (LCM) table -- core ``ModelSamplingDiscrete(lcm)``, AnimateDiff-Evolved's ``lcm`` schedules -- keeps
    only the 50 grid timesteps (t = k*skip + skip-1), so an off-grid s (TCD's floor((1-gamma)t'), the diffusers
    final step's s = 0) would be interpolated or clamped, while diffusers reads its full alpha-bar table there. The
    full table is rebuilt from the schedule's parameters and used when it reproduces every kept point.
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


def parametrisation(model_sampling) -> DiscreteVP:
    """The parametrisation record of a (duck-typed) model sampling object; ``ValueError`` for unsupported kinds."""
    ms = resolve_model_sampling(None, model_sampling)
    sigma, full = _full_sigma(ms)
    return DiscreteVP(timestep=ms.timestep, sigma=sigma, full_table=full)
