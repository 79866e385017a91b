"""fewstep samplers: pure-torch few-step consistency sampling math (LCM, TCD, PCM, Hyper-SD, Lightning).

``SAMPLERS`` is the one list of named samplers: the KSampler dropdown names, the SAMPLER nodes and the presets'
``sampler`` field all name a key here. Adding a sampler = its module (its switches and a k-diffusion function)
plus one entry. Nothing in this package imports ``comfy``: the host's ``model_sampling`` object is only used
duck-typed, through ``samplers.parametrisation``.
"""
from __future__ import annotations

from .consistency import sample_consistency
from .lcm import sample_lcm
from .pcm import sample_pcm
from .tcd import sample_tcd

#: name -> k-diffusion sampler ``(model, x, sigmas, extra_args, callback, disable, noise_sampler, **options)``.
SAMPLERS = {"lcm": sample_lcm, "tcd": sample_tcd, "pcm": sample_pcm, "consistency": sample_consistency}
