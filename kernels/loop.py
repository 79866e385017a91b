"""Sync-free consistency sampling loop built on the fused step, and the switch that picks it.

Per step: one model call, one fused-step launch (``kernels.consistency_step.fused_step``), nothing read back to
the host. Every branch is decided from Python ints (the step index), never from a device tensor, so the loop can
run ahead of the GPU and can sit inside a CUDA graph capture. The samplers (``samplers.consistency.run``) build the
coefficient table and draw the step noise; ``sample_fused`` puts the table on the device and runs the loop.
"""

from __future__ import annotations

import logging

import torch

from . import consistency_step
from .consistency_step import N_COEFFS, coefficient_table, fused_backend, fused_step

__all__ = ["use_fused", "sample_fused"]

log = logging.getLogger("fewstep")
_LOGGED: set = set()


def use_fused(mode: str, x: torch.Tensor) -> bool:
    """Whether a run in ``fused`` mode ``mode`` ("auto" / "on" / "off") takes the fused loop for latent ``x``: on a
    CUDA latent with Triton importable. "on" without them is an error naming what is missing; "auto" on a GPU
    without Triton says once why it runs the unfused loop."""
    if mode == "off":
        return False
    if not x.is_cuda:
        why = f"the latent is on {x.device}, and the fused kernel runs on CUDA"
    elif not consistency_step.triton_available():
        why = "triton cannot be imported in this Python (pip install triton, or triton-windows on Windows)"
    else:
        return True
    if mode == "on":
        raise ValueError(f"fewstep sampler: fused=on, but {why}; set fused to auto or off")
    if x.is_cuda and why not in _LOGGED:
        _LOGGED.add(why)
        log.info("fewstep: sampler fused=auto runs the unfused loop: %s", why)
    return False


def _trange(n: int, disable):
    try:
        from tqdm.auto import trange
    except Exception:  # tqdm is optional here (ComfyUI ships it)
        return range(n)
    return trange(n, disable=disable)


def _check_loop_args(x, sigmas, coeffs, noise) -> int:
    if coeffs.ndim != 2 or coeffs.shape[1] != N_COEFFS:
        raise ValueError(f"sample_fused: coeffs must be [n_steps, {N_COEFFS}], got {tuple(coeffs.shape)}")
    n = coeffs.shape[0]
    if sigmas.ndim != 1 or sigmas.shape[0] != n + 1:
        raise ValueError(f"sample_fused: sigmas must be 1-D with n_steps + 1 = {n + 1} entries, got {tuple(sigmas.shape)}")
    if noise is not None and (noise.shape[0] not in (n - 1, n) or tuple(noise.shape[1:]) != tuple(x.shape)):
        raise ValueError(
            f"sample_fused: noise must be [n_steps (or n_steps - 1), *x.shape] = [{n}, {', '.join(map(str, x.shape))}], "
            f"got {tuple(noise.shape)}"
        )
    return n


@torch.no_grad()
def sample_fused(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    coeffs,
    noise: torch.Tensor | None,
    extra_args: dict | None = None,
    callback=None,
    disable: bool | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Consistency-model sampling (Song et al. 2023, "Consistency Models"; Luo et al. 2023, "Latent Consistency
    Models"), k-diffusion signature, with every step fused into one kernel.

    Args:
        model: k-diffusion denoiser, ``model(x, sigma * s_in, **extra_args) -> x0`` (after CFG).
        x: initial latent, already scaled to ``sigmas[0]`` (k-diffusion convention).
        sigmas: ``[n_steps + 1]`` schedule on ``x.device`` (the model receives ``sigmas[i] * s_in``).
        coeffs: the run's coefficients: ``samplers.step.StepCoefficients`` (put on ``x.device`` here), or the
            kernel's ``[n_steps, 5]`` float32 table on ``x.device`` (columns ``COEFF_FIELDS``).
        noise: pre-drawn noise, row ``i`` used by step ``i``: ``[n_steps, *x.shape]`` when the last step adds
            noise too (a split schedule ending above sigma 0), ``[n_steps - 1, *x.shape]`` when it does not (the
            usual run to sigma 0: the last step then reads no noise), or ``None`` when no step is stochastic
            (``a_z`` is then ignored).
        extra_args / callback / disable: as in k-diffusion; the callback gets
            ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` with ``x`` before the update and ``denoised`` = x0
            (after the boundary condition) for previews.
        backend: ``None``/``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``; chosen once.

    No ``.item()``, no branch on a device tensor: whether step ``i`` reads noise is ``i < noise.shape[0]``.
    """
    extra_args = {} if extra_args is None else extra_args
    if not isinstance(coeffs, torch.Tensor):
        coeffs = coefficient_table(coeffs, x.device)
    n = _check_loop_args(x, sigmas, coeffs, noise)
    if backend in (None, "auto"):
        backend = fused_backend(x)
    sigma_in = sigmas.to(x)[:, None] * x.new_ones([x.shape[0]])  # row i: sigmas[i] per image, for the whole run
    for i in _trange(n, disable):
        denoised = model(x, sigma_in[i], **extra_args)
        z = noise[i] if (noise is not None and i < noise.shape[0]) else None
        x_next, x0 = fused_step(x, denoised, z, coeffs, i, backend=backend)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
        x = x_next
    return x

