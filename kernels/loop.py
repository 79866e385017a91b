"""Sync-free consistency sampling loop built on the fused step.

Per step: one model call, one fused-step launch (``kernels.consistency_step.fused_step``), nothing read back to
the host. Every branch is decided from Python ints (the step index), never from a device tensor, so the loop can
run ahead of the GPU and can sit inside a CUDA graph capture.
"""

from __future__ import annotations

import torch

from .coefficients import N_COEFFS
from .consistency_step import fused_backend, fused_step

__all__ = ["sample_fused"]


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
    coeffs: torch.Tensor,
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
        coeffs: ``[n_steps, 5]`` float32 on ``x.device`` from ``linear_coefficients`` (columns a_x, a_d, a_z, b_x, b_d).
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
    n = _check_loop_args(x, sigmas, coeffs, noise)
    if backend in (None, "auto"):
        backend = fused_backend(x)
    s_in = x.new_ones([x.shape[0]])
    for i in _trange(n, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        z = noise[i] if (noise is not None and i < noise.shape[0]) else None
        x_next, x0 = fused_step(x, denoised, z, coeffs, i, backend=backend)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
        x = x_next
    return x

