"""Noise that depends only on (seed, batch index): image k is the same whatever the batch size or device.

Every image in a batch gets its own ``torch.Generator`` seeded with ``batch_seed(seed, index, stream)``.
Stream 0 is the initial latent noise, stream 1 the per-step noise of stochastic samplers. Works for any
latent whose leading dimension is the batch: 4-D images, 5-D video ``[B, C, T, H, W]`` and AnimateDiff-style
frames-as-batch latents alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

__all__ = ["batch_seed", "initial_noise", "BatchStepNoise", "default_noise_sampler", "step_noise", "STREAM_INITIAL",
           "STREAM_STEP"]

log = logging.getLogger("fewstep")

STREAM_INITIAL = 0
STREAM_STEP = 1
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def batch_seed(seed: int, index: int, stream: int = 0) -> int:
    """Stable 64-bit mix of (seed, batch index, stream) into ``[0, 2**63)`` (chained splitmix64).

    Args:
        seed: user seed, any int (taken modulo 2**64).
        index: absolute batch index, >= 0 (``batch_offset + k``).
        stream: independent stream id, >= 0 (0 initial noise, 1 step noise).
    """
    for name, v in (("seed", seed), ("index", index), ("stream", stream)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if index < 0 or stream < 0:
        raise ValueError(f"index and stream must be >= 0, got index={index}, stream={stream}")
    z = _splitmix64(seed & _MASK64)
    z = _splitmix64(z ^ index)
    z = _splitmix64(z ^ (stream * 0xD1B54A32D192ED03 & _MASK64))
    return z >> 1


def _generator(seed: int, index: int, stream: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(batch_seed(seed, index, stream))
    return g


def initial_noise(
    shape: Sequence[int],
    seed: int,
    batch_indices: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Unit Gaussian initial noise of ``shape`` (full latent shape, batch first), drawn per image on the CPU.

    Args:
        shape: ``[B, C, H, W]`` or ``[B, C, T, H, W]`` (any ``ndim >= 2`` with the batch first).
        seed: user seed.
        batch_indices: absolute index of each image (default ``range(B)``); image with index k is identical
            whatever batch it is drawn in.
        dtype: result dtype (drawn in float32, then cast, so the values do not depend on it).
        device: result device (drawn on the CPU, so the values do not depend on it).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a latent shape with batch first and positive sizes, got {shape}")
    indices = list(range(shape[0])) if batch_indices is None else [int(i) for i in batch_indices]
    if len(indices) != shape[0]:
        raise ValueError(f"batch_indices has {len(indices)} entries but shape has batch {shape[0]}")
    noise = torch.stack(
        [torch.randn(shape[1:], generator=_generator(seed, i, STREAM_INITIAL, "cpu"), dtype=torch.float32) for i in indices]
    )
    return noise.to(device=device, dtype=dtype)


class BatchStepNoise:
    """Per-step noise sampler ``(sigma, sigma_next) -> tensor like x`` with one generator per image.

    Args:
        x_like: tensor whose shape/dtype/device the noise takes (batch first, any ndim >= 1).
        seed: user seed.
        batch_offset: absolute index of ``x_like[0]`` (so image k of a batch equals the same image alone).
        cpu: draw on CPU generators (default; same values on every device) or on ``x_like.device``.

    Draws are float32 and then cast to ``x_like.dtype``. Each call advances every image's generator once.
    """

    def __init__(self, x_like: torch.Tensor, seed: int, batch_offset: int = 0, cpu: bool = True) -> None:
        if x_like.ndim < 1 or x_like.shape[0] < 1:
            raise ValueError(f"x_like must have a non-empty batch dimension, got shape {tuple(x_like.shape)}")
        if isinstance(batch_offset, bool) or not isinstance(batch_offset, int) or batch_offset < 0:
            raise ValueError(f"batch_offset must be an int >= 0, got {batch_offset!r}")
        self.shape, self.dtype, self.device = tuple(x_like.shape), x_like.dtype, x_like.device
        self._draw_device = torch.device("cpu") if cpu else x_like.device
        self._generators = [_generator(seed, batch_offset + k, STREAM_STEP, self._draw_device) for k in range(self.shape[0])]

    def _draw(self) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.shape[1:], generator=g, device=self._draw_device, dtype=torch.float32) for g in self._generators]
        )

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return self._draw().to(device=self.device, dtype=self.dtype)

    def pre_draw(self, n_steps: int) -> torch.Tensor:
        """``[n_steps, *x.shape]``: exactly what ``n_steps`` successive calls would return (advances the streams)."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        if n_steps == 0:
            return torch.empty((0, *self.shape), dtype=self.dtype, device=self.device)
        return torch.stack([self._draw() for _ in range(n_steps)]).to(device=self.device, dtype=self.dtype)


def default_noise_sampler(x: torch.Tensor, seed: int | None, batch_offset: int = 0,
                          cpu: bool = True) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """fewstep's step noise when the caller passes no ``noise_sampler``: ``BatchStepNoise(x, seed, batch_offset, cpu)``.

    Without a seed, one is drawn from the global torch RNG (which the host seeds before sampling), so runs stay
    reproducible there but are no longer batch-index stable across different global RNG states.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        log.debug("fewstep: no seed in extra_args; step-noise seed %d drawn from the global torch RNG", seed)
    return BatchStepNoise(x, int(seed), batch_offset=batch_offset, cpu=cpu)


def step_noise(noise_sampler: Callable, x: torch.Tensor, sigmas: torch.Tensor,
               a_z: Sequence[float]) -> torch.Tensor | None:
    """Every step's noise of a run, drawn before the loop: ``[rows, *x.shape]``, row ``i`` for step ``i``.

    Only steps with ``a_z[i] > 0`` draw, in step order (so any noise sampler sees the calls the step-by-step loop
    would make, and ``BatchStepNoise`` gives its per-(seed, index) values, drawn with one ``pre_draw``); other rows
    are 0. ``rows`` is ``n_steps`` when the last step re-noises (a split schedule ending above sigma 0), else
    ``n_steps - 1`` (a run to sigma 0 reads no noise on its last step). ``None`` when no step draws.
    """
    noisy = [i for i, c in enumerate(a_z) if c > 0]
    if not noisy:
        return None
    if isinstance(noise_sampler, BatchStepNoise):
        drawn = noise_sampler.pre_draw(len(noisy))
    else:
        drawn = torch.stack([noise_sampler(sigmas[i], sigmas[i + 1]) for i in noisy])
    rows = len(a_z) if a_z[-1] > 0 else len(a_z) - 1
    if noisy == list(range(rows)):
        return drawn.to(x)
    noise = x.new_zeros((rows, *x.shape))
    noise[noisy] = drawn.to(x)
    return noise
