"""Timestep grids for few-step samplers and their conversion to k-diffusion sigmas.

The discrete-VP grids are lists of integer training timesteps in descending order. ``timesteps_to_sigmas`` turns
them into a SIGMAS tensor through any duck-typed ``model_sampling`` (host object or ``DiscreteSchedule``).
``grid_sigmas`` is the one entry point by grid name for either model kind: on a flow-matching model the same names
("trailing", "pcm", "fixed", "simple") are realised by ``samplers.flow`` on the model's own (shifted) sigmas, and
"flowmatch" is diffusers' FlowMatch default; "lcm", "tcd" and "turbo" are discrete-VP grids only.
Every invalid request raises ``ValueError`` naming the argument; nothing loops or hangs.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import torch

from . import flow
from .parametrisation import is_flow

LOG = logging.getLogger("fewstep")

__all__ = [
    "lcm_timesteps",
    "tcd_timesteps",
    "pcm_phase_timesteps",
    "trailing_timesteps",
    "fixed_timesteps",
    "strength_tail",
    "turbo_timesteps",
    "timesteps_to_sigmas",
    "GRIDS",
    "grid_sigmas",
]

#: Grid names ``grid_sigmas`` knows; the first three exist on discrete-VP models only, "flowmatch" on flow only.
GRIDS = ("lcm", "tcd", "turbo", "pcm", "trailing", "fixed", "simple", "flowmatch")
VP_ONLY = ("lcm", "tcd", "turbo")


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength (denoise) must be in (0, 1], got {strength!r}")
    return float(strength)


def _pick_evenly(descending_grid: np.ndarray, steps: int, strength: float) -> list[int]:
    """diffusers' ``origin[floor(linspace(0, len, steps, endpoint=False))]`` with a clear error instead of its."""
    if len(descending_grid) // steps < 1:
        raise ValueError(
            f"steps ({steps}) exceeds the number of grid points available at strength {strength:g} "
            f"({len(descending_grid)}); lower steps or raise strength/denoise"
        )
    idx = np.floor(np.linspace(0, len(descending_grid), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in descending_grid[idx]]


def lcm_timesteps(steps: int, original_steps: int = 50, strength: float = 1.0, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers ``LCMScheduler.set_timesteps(steps, original_inference_steps=original_steps, strength=strength)``.

    The skipping grid is ``k = T // original_steps``, ``{k-1, 2k-1, ..., int(original_steps*strength)*k - 1}``;
    ``steps`` evenly spaced indices of the reversed grid are taken. ``strength < 1`` (img2img) truncates the grid
    from the top exactly like diffusers (not ComfyUI's ``int(steps/denoise)`` tail trick).

    Args:
        steps: number of sampling steps, >= 1.
        original_steps: distillation grid size (50 for LCM/TCD, 100 for AnimateLCM's reference config).
        strength: img2img strength / denoise in (0, 1].
        num_train_timesteps: training timesteps of the base model (1000).
    """
    num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 1)
    steps = _check_int("steps", steps, 1)
    original_steps = _check_int("original_steps", original_steps, 1, num_train_timesteps)
    strength = _check_strength(strength)
    k = num_train_timesteps // original_steps
    grid = np.arange(1, int(original_steps * strength) + 1) * k - 1
    return _pick_evenly(grid[::-1], steps, strength)


def tcd_timesteps(
    steps: int, original_steps: int = 50, strength: float = 1.0, num_train_timesteps: int = 1000, *, full_grid: bool = False
) -> list[int]:
    """diffusers ``TCDScheduler.set_timesteps`` grid.

    With ``full_grid=False`` (diffusers: ``original_inference_steps`` left unset) this is the LCM grid of
    ``lcm_timesteps``. With ``full_grid=True`` (diffusers: ``original_inference_steps`` passed explicitly) the
    grid is every timestep ``0 .. int(T*strength) - 1`` and ``steps`` may not exceed ``original_steps``;
    e.g. 4 steps give 999, 749, 499, 249.
    """
    if not full_grid:
        return lcm_timesteps(steps, original_steps, strength, num_train_timesteps)
    num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 1)
    steps = _check_int("steps", steps, 1)
    original_steps = _check_int("original_steps", original_steps, 1, num_train_timesteps)
    strength = _check_strength(strength)
    if steps > original_steps:
        raise ValueError(f"steps ({steps}) cannot exceed original_steps ({original_steps})")
    grid = np.arange(0, int(num_train_timesteps * strength))
    return _pick_evenly(grid[::-1], steps, strength)


def pcm_phase_timesteps(phases: int, num_ddim_timesteps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """Start timesteps of the PCM phases (Wang et al. 2024, training script ``ddim_style_multiphase_pred``).

    ``ddim = arange(1, N+1) * (T // N) - 1``; phase starts are ``floor(linspace(0, N, phases, endpoint=False))``
    and phase ``j`` ends at ``ddim_prev[start_j] = ddim[start_j - 1]``. Sampling visits ``T-1`` then each inner
    phase edge: 4 phases of 50 give 999, 739, 499, 239 (with N=40, the SDXL script, they equal trailing).

    Args:
        phases: number of phases = sampling steps, 1 <= phases <= num_ddim_timesteps.
        num_ddim_timesteps: DDIM solver size used in training (50 for the SD1.5 scripts, 40 for the SDXL example).
    """
    num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 1)
    num_ddim_timesteps = _check_int("num_ddim_timesteps", num_ddim_timesteps, 1, num_train_timesteps)
    phases = _check_int("phases", phases, 1, num_ddim_timesteps)
    ddim = np.arange(1, num_ddim_timesteps + 1) * (num_train_timesteps // num_ddim_timesteps) - 1
    starts = np.floor(np.linspace(0, num_ddim_timesteps, phases, endpoint=False)).astype(np.int64)
    edges = [int(ddim[j - 1]) for j in starts[1:]]
    return [int(ddim[-1])] + edges[::-1]


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers ``timestep_spacing="trailing"`` (DDIM/Euler; Hyper-SD, SDXL-Lightning, PCM model cards).

    ``round(arange(T, 0, -T/steps)) - 1``: 4 steps give 999, 749, 499, 249.
    """
    num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 1)
    steps = _check_int("steps", steps, 1, num_train_timesteps)
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in ts]


def strength_tail(timesteps: list[int], strength: float = 1.0) -> list[int]:
    """diffusers' img2img rule for a grid spaced by step count (DDIM/Euler ``trailing``, PCM phase edges).

    ``StableDiffusionImg2ImgPipeline.get_timesteps``: keep the last ``min(int(n * strength), n)`` of the ``n``
    timesteps, so 4 trailing steps at strength 0.5 run 499, 249 (two of the LoRA's own timesteps).
    """
    strength = _check_strength(strength)
    n = len(timesteps)
    keep = min(n, int(n * strength))
    if keep < 1:
        raise ValueError(f"strength (denoise) {strength} keeps none of the {n} steps (diffusers keeps "
                         f"int(steps * strength)); raise strength or steps")
    return list(timesteps[n - keep:])


def turbo_timesteps(steps: int, strength: float = 1.0) -> list[int]:
    """Core ComfyUI's ``SDTurboScheduler`` (SDXL-Turbo / SD-Turbo): ``999, 899, ..., 99``, starting ``10 -
    int(10 * denoise)`` entries in and taking ``steps`` of them (1 step at strength 1 is t = 999)."""
    steps = _check_int("steps", steps, 1, 10)
    strength = _check_strength(strength)
    start = 10 - int(10 * strength)
    grid = [int(t) for t in (np.arange(1, 11) * 100 - 1)[::-1]][start:start + steps]
    if len(grid) < steps:
        raise ValueError(f"steps ({steps}) exceeds the {10 - start} SD-Turbo timesteps left at strength {strength:g}; "
                         "lower steps or raise strength/denoise")
    return grid


def fixed_timesteps(text: str, num_train_timesteps: int = 1000) -> list[int]:
    """Parse a user list such as ``"800"`` or ``"999, 499"`` into strictly descending integer timesteps."""
    if not isinstance(text, str):
        raise ValueError(f"timesteps must be a string like '800, 400', got {type(text).__name__}")
    parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
    if not parts:
        raise ValueError("timesteps is empty; give integers like '800, 400'")
    bad = next((p for p in parts if not re.fullmatch(r"[+-]?\d{1,6}", p)), None)
    if bad is not None:  # the message quotes the bad item, cut, never the whole text
        shown = repr(bad[:20]) + ("..." if len(bad) > 20 else "")
        raise ValueError(f"timesteps must be integers separated by commas; {shown} is not one")
    ts = [int(p) for p in parts]
    for t in ts:
        if not 0 <= t < num_train_timesteps:
            raise ValueError(f"timesteps values must be in [0, {num_train_timesteps - 1}], got {t}")
    i = next((i for i, (a, b) in enumerate(zip(ts, ts[1:])) if b >= a), None)
    if i is not None:
        raise ValueError(f"timesteps must be strictly descending; {ts[i]} is followed by {ts[i + 1]}")
    return ts


def timesteps_to_sigmas(timesteps, model_sampling, dtype: torch.dtype | None = None) -> torch.Tensor:
    """SIGMAS for ``timesteps`` (descending ints) via ``model_sampling.sigma``, with a trailing 0.

    Args:
        timesteps: descending integer timesteps (list or 1-D tensor).
        model_sampling: anything with ``.sigma(t: Tensor) -> Tensor`` (host ``ModelSamplingDiscrete`` or
            ``DiscreteSchedule``).
        dtype: result dtype; default is whatever ``model_sampling.sigma`` returns.

    Returns:
        1-D CPU float tensor of ``len(timesteps) + 1`` strictly decreasing sigmas ending in 0.
    """
    ts = torch.as_tensor(list(timesteps) if not torch.is_tensor(timesteps) else timesteps).reshape(-1)
    if ts.numel() == 0:
        raise ValueError("timesteps must not be empty")
    if ts.is_floating_point() and not torch.equal(ts, ts.round()):
        raise ValueError(f"timesteps must be integers, got {ts.tolist()}")
    sig = model_sampling.sigma(ts.to(torch.float64)).detach().cpu().reshape(-1)
    if dtype is not None:
        sig = sig.to(dtype)
    sig = torch.cat([sig, sig.new_zeros(1)])
    if not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError(f"timesteps must give strictly decreasing sigmas; got timesteps {ts.tolist()} -> sigmas {sig.tolist()}")
    if not math.isfinite(float(sig.sum())):
        raise ValueError(f"model_sampling.sigma returned non-finite sigmas for timesteps {ts.tolist()}")
    timestep = getattr(model_sampling, "timestep", None)
    if callable(timestep):
        seen = torch.as_tensor(timestep(sig[:-1])).detach().cpu().reshape(-1).round().long()
        if not torch.equal(seen, ts.long()):
            LOG.warning("the model's sigma table cannot place timesteps %s: the UNet will be told %s. A distilled "
                        "(LCM) table -- ModelSamplingDiscrete(lcm), an LCM beta schedule -- keeps 50 timesteps only; "
                        "remove that node for this schedule (fewstep's schedules need none)",
                        ts.tolist(), seen.tolist())
    return sig


def _vp_timesteps(grid: str, steps, strength: float, original_steps: int, num_ddim_timesteps: int, text: str,
                  full_grid: bool) -> list[int]:
    if grid == "lcm":
        return lcm_timesteps(steps, original_steps, strength)
    if grid == "tcd":
        return tcd_timesteps(steps, original_steps, strength, full_grid=full_grid)
    if grid == "turbo":
        return turbo_timesteps(steps, strength)
    if grid == "pcm":
        return strength_tail(pcm_phase_timesteps(steps, num_ddim_timesteps), strength)
    if grid == "trailing":
        return strength_tail(trailing_timesteps(steps), strength)
    ts = fixed_timesteps(text)
    if strength != 1.0:
        raise ValueError(f"fixed timesteps {ts} have no img2img rule; set strength/denoise to 1.0")
    return ts


def _flow_sigmas(grid: str, model_sampling, steps, strength: float, num_ddim_timesteps: int, text: str,
                 img2img: str) -> torch.Tensor:
    if grid in VP_ONLY:
        raise ValueError(f"the {grid!r} grid places discrete (SD/SDXL) training timesteps; this model is flow matching "
                         "(CONST): use the trailing, simple, flowmatch or PCM grid (FewStep Trailing / PCM Schedule, "
                         "core BasicScheduler 'simple')")
    if grid == "fixed":
        sig = flow.fixed_sigmas(text)
        if strength != 1.0:
            raise ValueError("fixed timesteps have no img2img rule; set strength/denoise to 1.0")
        return sig
    if grid == "simple":
        sig = flow.simple_sigmas(model_sampling, steps)
    else:
        sig = flow.fractions_to_sigmas(flow.grid_fractions(grid, steps, model_sampling, num_ddim_timesteps),
                                       model_sampling)
    keep = flow.strength_keep(len(sig) - 1, strength, img2img)
    return sig[len(sig) - 1 - keep:]


def grid_sigmas(grid: str, model_sampling, steps: int | None = None, strength: float = 1.0, *,
                original_steps: int = 50, num_ddim_timesteps: int = 50, timesteps: str = "", full_grid: bool = False,
                img2img: str = "flow") -> torch.Tensor:
    """SIGMAS (CPU, trailing 0) of the grid ``grid`` (one of ``GRIDS``) for ``steps`` steps on ``model_sampling``,
    cut for img2img ``strength`` by the grid's rule: LCM/TCD/turbo cut their grid first (diffusers / core
    SDTurboScheduler); trailing/PCM keep the last ``int(n*strength)`` on SD models, and on flow models by
    ``img2img`` ("flow": diffusers' SD3/Flux/Qwen-Image img2img; "int": Wan's video2video); fixed timesteps
    (``timesteps``, text) refuse strength < 1. On a flow model the grids are placed on the model's own sigmas
    (its shift: pass ``samplers.flow.with_shift(ms, shift)`` for another one)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown schedule {grid!r}; one of {GRIDS}")
    if is_flow(model_sampling):
        return _flow_sigmas(grid, model_sampling, steps, strength, num_ddim_timesteps, timesteps, img2img)
    if grid == "flowmatch":
        raise ValueError("the flowmatch grid (diffusers' FlowMatchEulerDiscreteScheduler) is for flow-matching "
                         "models; this model is discrete VP (SD/SDXL)")
    if grid == "simple":
        sig = flow.simple_sigmas(model_sampling, steps)
        return sig[len(sig) - 1 - len(strength_tail(list(range(len(sig) - 1)), strength)):]
    ts = _vp_timesteps(grid, steps, strength, original_steps, num_ddim_timesteps, timesteps, full_grid)
    return timesteps_to_sigmas(ts, model_sampling).cpu()
