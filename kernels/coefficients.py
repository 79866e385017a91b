"""Per-step linear coefficients of the consistency (LCM / TCD-style) step.

The sampler builds its table with ``samplers.consistency.linear_step_coefficients`` (which also handles the
diffusers final step); this host-free builder, from per-step sigma_s / c_skipv / c_out, serves the kernel tests and
benchmarks. ``tests/math/test_coefficients_agree.py`` keeps the two equal.

k-diffusion VE space, ``x = x0 + sigma * eps``. For step ``i`` with model output ``D_raw`` (x0 after CFG):

    D      = c_out[i] * D_raw + c_skipv[i] * x          (optional LCM boundary condition;
                                                         c_skipv already holds the 1/sqrt(1+sigma_i^2) VP factor)
    eps    = (x - D) / sigma_i
    x_s    = D + sigma_s[i] * eps
    x_next = x_s + n_i * z,   n_i = sqrt(sigma_{i+1}^2 - sigma_s[i]^2)   (0 on the last step)

Everything is linear in ``(x, D_raw, z)``. With ``r = sigma_s[i] / sigma_i``:

    x_next = a_x * x + a_d * D_raw + a_z * z      a_x = r + (1 - r) * c_skipv,  a_d = (1 - r) * c_out,  a_z = n_i
    x0     = b_x * x + b_d * D_raw                b_x = c_skipv,                b_d = c_out

Layout: one row per step, ``[n_steps, 5]`` float32, columns ``COEFF_FIELDS``.
Pure torch; no ``comfy`` and no ``triton`` import.
"""

from __future__ import annotations

import torch

__all__ = ["COEFF_FIELDS", "N_COEFFS", "linear_coefficients"]

#: Column order of the coefficient tensor (also the order the Triton kernel reads them in).
COEFF_FIELDS = ("a_x", "a_d", "a_z", "b_x", "b_d")
N_COEFFS = len(COEFF_FIELDS)


def _per_step(value, n: int, name: str, device: torch.device) -> torch.Tensor:
    """Broadcast a float or a 0-d/1-d tensor to a float64 [n] tensor on ``device``."""
    t = torch.as_tensor(value, dtype=torch.float64).to(device=device, dtype=torch.float64)
    if t.ndim == 0:
        return t.expand(n)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"linear_coefficients: {name} must be a float or a 1-D tensor of length n_steps={n}, got shape {tuple(t.shape)}")
    return t


def linear_coefficients(
    sigmas: torch.Tensor,
    sigma_s: torch.Tensor | float = 0.0,
    c_skipv: torch.Tensor | float | None = None,
    c_out: torch.Tensor | float | None = None,
    scale: torch.Tensor | float | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coefficients ``[n_steps, 5]`` (float32; columns ``a_x, a_d, a_z, b_x, b_d``) for the fused consistency step.

    Args:
        sigmas: k-diffusion schedule, 1-D, length ``n_steps + 1`` (the last entry is the final sigma, usually 0).
        sigma_s: per-step target sigma of the consistency jump (``[n_steps]`` or a float; 0 = plain LCM, x_s = D).
        c_skipv: per-step skip coefficient applied to ``x`` (VP factor included); ``None`` = no boundary condition (0).
        c_out: per-step output coefficient applied to ``D_raw``; ``None`` = no boundary condition (1).
        scale: per-step factor on ``x_next`` without the noise (``None`` = 1); the sampler's diffusers final step
            uses ``1/sqrt(1 + sigma_s^2)`` there (``StepCoefficients.scale``).
        device: where the result lives; default ``sigmas.device``. Put it on the latent's device before the loop.

    The math is float64 (on the CPU when the target is MPS, which has no float64); only the result is float32.
    ``sigma_i == 0`` gives ``r = 0`` (``x_next = D``) instead of a division by zero. ``sigma_{i+1}^2 - sigma_s^2``
    is clamped at 0. A step to sigma 0 adds no noise (``a_z = 0``); a schedule that ends above 0 (a split one)
    re-noises on its last step too, as the sampler does.
    This is a pre-loop computation: it may read nothing back, but it does run a handful of tiny ops.
    """
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"linear_coefficients: sigmas must be 1-D with n_steps + 1 >= 2 entries, got shape {tuple(sigmas.shape)}")
    out_device = torch.device(device) if device is not None else sigmas.device
    work = torch.device("cpu") if out_device.type == "mps" else out_device
    n = sigmas.shape[0] - 1

    sig = sigmas.detach().to(device=work, dtype=torch.float64)
    s_i, s_next = sig[:-1], sig[1:]
    s_s = _per_step(sigma_s, n, "sigma_s", work)
    skip = _per_step(0.0 if c_skipv is None else c_skipv, n, "c_skipv", work)
    cout = _per_step(1.0 if c_out is None else c_out, n, "c_out", work)
    vp = _per_step(1.0 if scale is None else scale, n, "scale", work)

    nonzero = s_i != 0
    r = torch.where(nonzero, s_s / torch.where(nonzero, s_i, torch.ones_like(s_i)), torch.zeros_like(s_i))
    a_x = vp * (r + (1.0 - r) * skip)
    a_d = vp * (1.0 - r) * cout
    a_z = torch.where(s_next == 0, 0.0, torch.sqrt(torch.clamp(s_next * s_next - s_s * s_s, min=0.0)))
    coeffs = torch.stack([a_x, a_d, a_z, skip, cout], dim=1)
    return coeffs.to(device=out_device, dtype=torch.float32).contiguous()
