"""KSampler dropdown entries: the pack's samplers and schedulers, registered in place and idempotently.

Documented names (never renamed, never shadowing a core name):

samplers   fewstep_lcm  fewstep_tcd  fewstep_pcm  fewstep_auto
schedulers fewstep_lcm50  fewstep_lcm100  fewstep_lcm25  fewstep_pcm50  fewstep_pcm40  fewstep_trailing  fewstep_auto

The sampler names run the named samplers of ``samplers/`` (``fewstep_lcm`` is ``samplers.lcm.sample_lcm``, ...);
they read gamma, final_step, noise device and batch offset from the FewStep Settings model patch at sample time.
``fewstep_auto`` sampler and scheduler follow the preset chosen in FewStep Settings, which the model carries in its
``model_options`` only, so nodes that replace the model sampling (core ModelSamplingDiscrete, AnimateDiff-Evolved's
loader) may sit before or after FewStep Settings.
"""
from __future__ import annotations

import functools
import logging
import sys

import comfy.k_diffusion.sampling as ksampling
import comfy.model_patcher
import comfy.samplers as csamplers

from ..samplers import SAMPLERS, consistency, schedules
from ..samplers import presets as preset_table
from . import engine

log = logging.getLogger("fewstep")

SAMPLER_NAMES = {"fewstep_lcm": "lcm", "fewstep_tcd": "tcd", "fewstep_pcm": "pcm"}
AUTO = "fewstep_auto"
_MAX_FRAMES = 40


def _auto_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
    settings = consistency.settings(extra_args)
    name = settings.get("preset")
    if not name:
        raise ValueError("KSampler sampler 'fewstep_auto' needs a FewStep Settings node with a preset on the model; "
                         "add one, or pick fewstep_lcm / fewstep_tcd / fewstep_pcm")
    sampler = preset_table.get_preset(name).sampler
    if sampler != "tcd" and "gamma" in settings:
        log.warning("fewstep_auto: preset %r samples with %s, which has no gamma; FewStep Settings' gamma %s is "
                    "not used (pick sampler fewstep_tcd to use it)", name, sampler, settings["gamma"])
    return SAMPLERS[sampler](model, x, sigmas, extra_args, callback, disable, noise_sampler, **options)


DENOISE_HINT = ("; with denoise below 1, KSampler asks the scheduler for int(steps / denoise) steps and runs the "
                "last `steps` of them: raise denoise, or for diffusers' img2img rule use SamplerCustom with a FewStep "
                "schedule node's strength/denoise input")


def _grid_scheduler(grid_fn, model_sampling, steps):
    try:
        return schedules.timesteps_to_sigmas(grid_fn(steps), model_sampling)
    except ValueError as e:
        raise ValueError(f"fewstep scheduler: {e}{DENOISE_HINT}") from None


def settings_for_schedule(model_sampling) -> dict:
    """FewStep Settings' options on the model whose schedule the host is building.

    The host calls a scheduler with the model sampling object only (``KSampler.calculate_sigmas``,
    ``BasicScheduler``), while the settings live in the model patcher's ``model_options``; so the patcher is looked
    up in the calling frames: the nearest frame holding a patcher (or a ``comfy.samplers.KSampler``, through its
    ``model``) whose model sampling is this very object. Among several there (clones share their model sampling),
    the one carrying FewStep Settings. ``{}`` when none is found.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        found = []
        for value in list(frame.f_locals.values()):
            patcher = value.model if isinstance(value, csamplers.KSampler) else value
            if isinstance(patcher, comfy.model_patcher.ModelPatcher) and \
                    patcher.get_model_object("model_sampling") is model_sampling:
                found.append(consistency.settings({"model_options": patcher.model_options}))
        if found:
            return next((s for s in found if s), found[0])
        frame = frame.f_back
    return {}


def _auto_scheduler(model_sampling, steps):
    settings = settings_for_schedule(model_sampling)
    name = settings.get("preset")
    if not name:
        raise ValueError("KSampler scheduler 'fewstep_auto' needs a FewStep Settings node with a preset on the model")
    preset = preset_table.get_preset(name)
    try:
        timesteps = preset_table.preset_timesteps(preset, steps, base=settings.get("base", ""))
    except ValueError as e:
        raise ValueError(f"fewstep_auto scheduler (preset {name!r}): {e}{DENOISE_HINT}") from None
    if preset.schedule == "fixed" and steps != len(timesteps):
        log.warning("fewstep_auto: preset %r always runs the timesteps %s; KSampler's steps (%d, or steps/denoise) "
                    "and denoise are not used", name, timesteps, steps)
    return schedules.timesteps_to_sigmas(timesteps, model_sampling)


SCHEDULERS = {
    "fewstep_lcm50": lambda n: schedules.lcm_timesteps(n, 50),
    "fewstep_lcm100": lambda n: schedules.lcm_timesteps(n, 100),
    "fewstep_lcm25": lambda n: schedules.lcm_timesteps(n, 25),
    "fewstep_pcm50": lambda n: schedules.pcm_phase_timesteps(n, 50),
    "fewstep_pcm40": lambda n: schedules.pcm_phase_timesteps(n, 40),
    "fewstep_trailing": schedules.trailing_timesteps,
}


def _append(lst: list, name: str) -> None:
    if name not in lst:
        lst.append(name)


def register() -> None:
    """Add the names to the host's lists in place (the lists KSampler and KSamplerSelect read)."""
    for name, key in SAMPLER_NAMES.items():
        if not hasattr(ksampling, "sample_" + name):
            setattr(ksampling, "sample_" + name, engine.for_host(SAMPLERS[key]))
    ksampling.sample_fewstep_auto = engine.for_host(_auto_sampler)
    for name in (*SAMPLER_NAMES, AUTO):
        _append(csamplers.KSAMPLER_NAMES, name)
        _append(csamplers.SAMPLER_NAMES, name)  # the same object as KSampler.SAMPLERS
    for name, grid in SCHEDULERS.items():
        csamplers.SCHEDULER_HANDLERS[name] = csamplers.SchedulerHandler(functools.partial(_grid_scheduler, grid))
        _append(csamplers.SCHEDULER_NAMES, name)  # the same object as KSampler.SCHEDULERS
    csamplers.SCHEDULER_HANDLERS[AUTO] = csamplers.SchedulerHandler(_auto_scheduler)
    _append(csamplers.SCHEDULER_NAMES, AUTO)
