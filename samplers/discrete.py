"""Discrete VP noise schedule with the duck-typed interface of ComfyUI's ``ModelSamplingDiscrete``.

Used by tests and host-free code. At run time the node layer passes the host's ``model_sampling`` instead,
so the sampler math only ever calls ``.sigma(t)`` / ``.timestep(sigma)`` / ``.sigmas``.

Beta-schedule names follow ComfyUI: ``"linear"`` is diffusers ``"scaled_linear"`` (linear in sqrt(beta)) and
``"sqrt_linear"`` is diffusers ``"linear"`` (linear in beta).
"""

from __future__ import annotations

import torch

__all__ = ["DiscreteSchedule", "SigmaTable", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "sqrt_linear")


class SigmaTable:
    """A model sampling with an ascending ``sigmas`` table: its ends, as the host's model samplings expose them."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]


class DiscreteSchedule(SigmaTable):
    """VP schedule ``sigma_t = sqrt((1 - abar_t) / abar_t)`` built from betas, indexed by integer timestep.

    Args:
        beta_schedule: ``"linear"`` (ComfyUI default, SD1.5/SDXL) or ``"sqrt_linear"`` (e.g. AnimateLCM).
        linear_start: first beta (or its square for "linear", as in ComfyUI's ``make_beta_schedule``).
        linear_end: last beta.
        num_timesteps: number of training timesteps (table length).
        dtype: dtype of the sigma table (``torch.float32`` like the host, ``torch.float64`` for exact tests).
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        num_timesteps: int = 1000,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        if not 0.0 < linear_start < linear_end < 1.0:
            raise ValueError(f"linear_start/linear_end must satisfy 0 < linear_start < linear_end < 1, got {linear_start}, {linear_end}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if beta_schedule == "linear":
            betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.beta_schedule = beta_schedule
        self.num_timesteps = num_timesteps
        self.sigmas = sigmas.to(dtype)  # ascending: sigmas[t] is the noise level of timestep t
        self.log_sigmas = sigmas.log().to(dtype)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest table index by log-distance (same rule as the host); long tensor shaped like ``sigma``."""
        sigma = torch.as_tensor(sigma)
        dists = sigma.log().to(self.log_sigmas.dtype).reshape(1, -1) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Log-linear interpolation of the table at (possibly fractional) ``timestep``, clamped to the table."""
        t = torch.as_tensor(timestep).to(self.log_sigmas.dtype).clamp(0, self.num_timesteps - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
