"""The host's view of a fewstep sampler: the named samplers of ``samplers/`` with the two host facts they need.

The KSampler dropdown names (``registry``) and the SAMPLER nodes (``make_sampler``) call the named k-diffusion
samplers (``samplers.SAMPLERS``) through ``for_host``, which passes them, as values:

* the step noise: when something replaced the host's ``default_noise_sampler`` for this run (AnimateDiff-Evolved
  does, for video noise), that sampler, as core samplers would use it; else none, and the sampler draws fewstep's
  per-(seed, batch index) noise;
* CUDA-graph capture of the UNet call for the fused loop (``graphs.with_graph_capture``).
"""
from __future__ import annotations

import functools

import comfy.k_diffusion.sampling as ksampling
import comfy.samplers

from ..samplers import SAMPLERS
from . import graphs

# Captured when the pack registers, before any sampling: if AnimateDiff-Evolved (or anything else) swaps
# `default_noise_sampler` during a run, the pack follows it, as core samplers do.
_CORE_DEFAULT_NOISE_SAMPLER = ksampling.default_noise_sampler


def host_noise_sampler(x, seed):
    """The host's replaced ``default_noise_sampler(x, seed=seed)``, or None while it is core's own."""
    patched = ksampling.default_noise_sampler
    if patched is _CORE_DEFAULT_NOISE_SAMPLER:
        return None
    return patched(x, seed=seed)


def for_host(sample):
    """``sample`` (a fewstep k-diffusion sampler) as the host calls it (see module docstring)."""

    @functools.wraps(sample)
    def run(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
        extra_args = {} if extra_args is None else extra_args
        if noise_sampler is None:
            noise_sampler = host_noise_sampler(x, extra_args.get("seed"))
        return sample(model, x, sigmas, extra_args, callback, disable, noise_sampler,
                      capture=graphs.with_graph_capture, **options)

    return run


def make_sampler(kind: str, **options) -> comfy.samplers.KSAMPLER:
    """A SAMPLER object for SamplerCustom / SamplerCustomAdvanced running ``samplers.SAMPLERS[kind]``."""
    return comfy.samplers.KSAMPLER(for_host(SAMPLERS[kind]), extra_options=dict(options))
