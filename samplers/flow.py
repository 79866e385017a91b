"""Flow-matching (CONST) facts, host-free: model samplings twins and the few-step grids on flow models.

A flow-matching model (SD3, Flux, Wan 2.1/2.2, Qwen-Image, HunyuanVideo) noises as ``x = (1 - sigma)*x0 +
sigma*eps`` with sigma in [0, 1]. ComfyUI gives it one of two model samplings (``comfy/model_sampling.py``):

* ``ModelSamplingDiscreteFlow`` (SD3, Wan, HunyuanVideo; ``ModelSamplingSD3`` / ``ModelSamplingAuraFlow`` nodes):
  ``sigma(t) = shift*u / (1 + (shift - 1)*u)`` with ``u = t / multiplier``, and ``timestep(sigma) = sigma *
  multiplier`` -- note ``timestep`` does not undo the shift: the model is conditioned on the *shifted* sigma;
* ``ModelSamplingFlux`` (Flux, and Qwen-Image as the host loads it): ``sigma(t) = e^mu / (e^mu + 1/t - 1)``,
  ``timestep(sigma) = sigma``.

Both condition the model on ``k * sigma`` (``k = timestep(1)``: the multiplier, or 1), and both place a grid given as
*unshifted* fractions ``u`` in (0, 1] at ``sigma(u * k)``. So every grid here is a list of fractions ``u``, and the
model sampling (the user's, or a twin with a preset's shift, ``with_shift``) shifts it. The twins below reproduce
the host's classes (same float32 tables) for host-free code and tests.

Grids (``grid_fractions``), each as its reference builds it:

* ``trailing``: ``u = linspace(1, 1/N, N)`` -- diffusers' Flux / Qwen-Image pipelines, LightX2V's
  ``denoising_step_list`` [1000, 750, 500, 250], HunyuanVideo's ``linspace(1, 0, N+1)``;
* ``simple``: core ComfyUI's ``simple`` scheduler, indexed in the model's own sigma table (``simple_sigmas``);
* ``flowmatch``: diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)`` default, ``u = linspace(1,
  sigma_min, N)`` with ``sigma_min = sigma(1/1000)`` (the scheduler shifts the already shifted end point again) --
  what the SD3 pipeline runs (Hyper-SD3's card);
* ``pcm``: Phased Consistency Models' flow schedulers (G-U-N/Phased-Consistency-Model,
  ``code/text_to_image_sd3/pcm_fm_*_scheduler.py``): the 1000 shifted sigmas sub-sampled at t = 1000 - 20k (50
  points), ``N`` of them picked at ``floor(linspace(0, 50, N, endpoint=False))``: 1000/760/500/260 for 4 phases.

Fixed timesteps on a flow model are the model's timesteps on the 0..1000 scale that diffusers' FlowMatch schedulers
and the model cards print (``sigma * 1000``), so they are placed at ``sigma = t / 1000`` whatever the shift.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from .discrete import SigmaTable

__all__ = ["CONST", "FlowSchedule", "FluxSchedule", "timestep_scale", "with_shift", "time_snr_shift",
           "FLOW_GRIDS", "grid_fractions", "fractions_to_sigmas", "simple_sigmas", "fixed_sigmas",
           "strength_keep", "TRAIN_STEPS"]

TRAIN_STEPS = 1000
FLOW_GRIDS = ("trailing", "simple", "flowmatch", "pcm")


class CONST:
    """Marker named as the host's flow-matching prediction type (``comfy.model_sampling.CONST``), so that one rule
    (``"CONST"`` in the class's MRO names) recognises the host's flow model samplings and the twins below."""


def time_snr_shift(shift: float, u):
    """The host's ``time_snr_shift``: ``shift*u / (1 + (shift - 1)*u)`` (the identity at shift 1)."""
    if shift == 1.0:
        return u
    return shift * u / (1 + (shift - 1) * u)


class FlowSchedule(SigmaTable, CONST):
    """Twin of ComfyUI's ``ModelSamplingDiscreteFlow`` (+ CONST): SD3, Wan, HunyuanVideo (multiplier 1000) and
    ``ModelSamplingAuraFlow`` (Qwen-Image-Lightning's workflow; multiplier 1). ``sigmas`` is the host's table,
    built the same way (``dtype`` float32 as the host; float64 for exact tests)."""

    def __init__(self, shift: float = 1.0, multiplier: float = 1000, timesteps: int = TRAIN_STEPS,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"shift must be a number > 0, got {shift!r}")
        self.shift, self.multiplier = float(shift), multiplier
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1, dtype=dtype) / timesteps) * multiplier)

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)


class FluxSchedule(SigmaTable, CONST):
    """Twin of ComfyUI's ``ModelSamplingFlux`` (+ CONST): ``sigma(t) = e^mu / (e^mu + 1/t - 1)``, timestep = sigma;
    ``shift`` is mu (1.15 for 1024x1024 through core ModelSamplingFlux's defaults)."""

    def __init__(self, shift: float = 1.15, timesteps: int = 10000, dtype: torch.dtype = torch.float32) -> None:
        self.shift = float(shift)
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, 1, dtype=dtype) / timesteps)

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / timestep - 1))


def timestep_scale(model_sampling) -> float | None:
    """``k`` with ``timestep(sigma) = k * sigma`` for every sigma (the multiplier; 1 for Flux), or None when the
    model sampling's timestep is not proportional to sigma (a flow sampling the few-step step cannot serve)."""
    probe = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    try:
        t = torch.as_tensor(model_sampling.timestep(probe)).detach().to("cpu", torch.float64).reshape(-1)
    except Exception:  # any failure means: not a model sampling this step knows how to read
        return None
    if t.numel() != 3 or not bool(torch.isfinite(t).all()) or not float(t[0]) > 0:
        return None
    if not torch.allclose(t / probe, t[:1].expand(3), rtol=1e-6, atol=0.0):
        return None
    return float(t[0])


def with_shift(model_sampling, shift: float) -> FlowSchedule:
    """A twin of ``ModelSamplingSD3`` / ``ModelSamplingAuraFlow`` with ``shift`` on the timestep scale of
    ``model_sampling`` (what those core nodes would give this model): the model is still conditioned on the same
    ``k * sigma``, only the grid's sigmas move."""
    k = timestep_scale(model_sampling)
    if k is None:
        raise ValueError(f"a shift can only be applied to a flow-matching model sampling, not "
                         f"{type(model_sampling).__name__}")
    return FlowSchedule(shift, multiplier=int(k) if float(k).is_integer() else k)


def _check_steps(steps, hi: int | None = None) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1 or (hi and steps > hi):
        raise ValueError(f"steps must be an int in [1, {hi}], got {steps!r}" if hi else
                         f"steps must be an int >= 1, got {steps!r}")
    return int(steps)


def grid_fractions(grid: str, steps: int, model_sampling=None, pcm_timesteps: int = 50) -> list[float]:
    """The unshifted fractions ``u`` (descending, in (0, 1]) of ``grid`` ("trailing", "flowmatch", "pcm") for
    ``steps`` steps; ``model_sampling`` is needed by "flowmatch" (its end point is a shifted sigma). "simple" reads the
    model's table: see ``simple_sigmas``."""
    if grid == "trailing":
        n = _check_steps(steps, TRAIN_STEPS)
        return [float(u) for u in np.linspace(1.0, 1.0 / n, n)]
    if grid == "flowmatch":
        n = _check_steps(steps, TRAIN_STEPS)
        k = timestep_scale(model_sampling)
        end = float(torch.as_tensor(model_sampling.sigma(torch.tensor(k / TRAIN_STEPS, dtype=torch.float64))))
        return [float(t) / TRAIN_STEPS for t in np.linspace(TRAIN_STEPS * 1.0, TRAIN_STEPS * end, n)]
    if grid == "pcm":
        if isinstance(pcm_timesteps, bool) or not isinstance(pcm_timesteps, int) or not 1 <= pcm_timesteps <= TRAIN_STEPS:
            raise ValueError(f"num_ddim_timesteps (PCM's pcm_timesteps) must be an int in [1, {TRAIN_STEPS}], got "
                             f"{pcm_timesteps!r}")
        n = _check_steps(steps, pcm_timesteps)
        stride = TRAIN_STEPS // pcm_timesteps
        picked = np.floor(np.linspace(0, pcm_timesteps, num=n, endpoint=False)).astype(np.int64)
        return [float((pcm_timesteps - int(j)) * stride) / TRAIN_STEPS for j in picked]
    raise ValueError(f"unknown flow grid {grid!r}; one of {FLOW_GRIDS}")


def _finish(sig: torch.Tensor, what: str, sigma_max: float = 1.0) -> torch.Tensor:
    sig = torch.cat([sig.reshape(-1), sig.new_zeros(1)])
    if not bool(torch.isfinite(sig).all()) or not bool((sig[1:] < sig[:-1]).all()) or float(sig[0]) > sigma_max * (1 + 1e-6):
        raise ValueError(f"{what} gives sigmas that are not strictly decreasing in (0, {sigma_max:g}]: {sig.tolist()}")
    return sig


def fractions_to_sigmas(fractions, model_sampling, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SIGMAS (CPU, ``dtype``, trailing 0) at ``sigma(u * k)`` of ``model_sampling`` for fractions ``u``."""
    k = timestep_scale(model_sampling)
    if k is None:
        raise ValueError(f"{type(model_sampling).__name__} is not a flow-matching model sampling")
    u = torch.as_tensor(list(fractions), dtype=torch.float64)
    sig = torch.as_tensor(model_sampling.sigma(u * k)).detach().to("cpu", torch.float64)
    return _finish(sig, f"fractions {u.tolist()}").to(dtype)


def simple_sigmas(model_sampling, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Core ComfyUI's ``simple`` scheduler (``comfy.samplers.simple_scheduler``): ``steps`` entries of the model's own
    sigma table at ``-(1 + int(i * len / steps))``, then 0 -- on a flow model, the shifted ``1 - i/steps`` grid (any
    model with a ``sigmas`` table works)."""
    table = model_sampling.sigmas
    n = _check_steps(steps, len(table))
    ss = len(table) / n
    sig = torch.tensor([float(table[-(1 + int(x * ss))]) for x in range(n)], dtype=torch.float64)
    return _finish(sig, f"simple at {n} steps", float(table.max())).to(dtype)


def fixed_sigmas(text: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed timesteps on a flow model: the model's own timesteps on the 0..1000 scale (``sigma * 1000``, as the
    model cards and diffusers' FlowMatch schedulers print them, e.g. "1000, 937.5, 833.3, 625"), strictly
    descending in (0, 1000]; SIGMAS ``t / 1000`` with a trailing 0."""
    if not isinstance(text, str):
        raise ValueError(f"timesteps must be a string like '1000, 750', got {type(text).__name__}")
    parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
    if not parts:
        raise ValueError("timesteps is empty; give numbers like '1000, 750, 500, 250'")
    try:
        ts = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"timesteps must be numbers separated by commas, got {text!r}") from None
    for t in ts:
        if not 0 < t <= TRAIN_STEPS:
            raise ValueError(f"timesteps on a flow-matching model are sigma*1000, in (0, {TRAIN_STEPS}]; got {t:g}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}")
    return _finish(torch.tensor(ts, dtype=torch.float64) / TRAIN_STEPS, f"timesteps {ts}").to(dtype)


def strength_keep(n: int, strength: float, rule: str = "flow") -> int:
    """How many of ``n`` steps an img2img run at ``strength`` keeps (the last ones), by the pipeline's rule:
    ``"flow"`` -- diffusers' SD3 / Flux / Qwen-Image img2img ``get_timesteps``: ``n - int(max(n - min(n*s, n), 0))``;
    ``"int"`` -- SD's and Wan's video2video: ``min(int(n*s), n)``."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength (denoise) must be in (0, 1], got {strength!r}")
    if rule == "flow":
        keep = n - int(max(n - min(n * strength, n), 0))
    elif rule == "int":
        keep = min(int(n * strength), n)
    else:
        raise ValueError(f"unknown img2img rule {rule!r}")
    if keep < 1:
        raise ValueError(f"strength (denoise) {strength} keeps none of the {n} steps; raise strength or steps")
    return keep
