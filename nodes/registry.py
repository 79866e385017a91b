"""KSampler dropdown entries: the pack's samplers and schedulers, registered in place and idempotently.

Documented names (never renamed, never shadowing a core name):

samplers   fewstep_lcm  fewstep_tcd  fewstep_pcm  fewstep_auto
schedulers fewstep_lcm50  fewstep_lcm100  fewstep_lcm25  fewstep_pcm50  fewstep_pcm40  fewstep_trailing  fewstep_auto

The sampler names run the named samplers of ``samplers/`` (``fewstep_lcm`` is ``samplers.lcm.sample_lcm``, ...);
they read gamma, final_step, noise device and batch offset from the FewStep Settings model patch at sample time.
``fewstep_auto`` sampler and scheduler follow the preset chosen in FewStep Settings, which the model carries in its
``model_options`` only, so nodes that replace the model sampling (core ModelSamplingDiscrete, AnimateDiff-Evolved's
loader) may sit before or after FewStep Settings. On flow-matching models the ``fewstep_auto`` scheduler places the
preset's grid with the card's shift, unless a ModelSampling* node replaced the model sampling (then its shift is
used); ``fewstep_trailing`` / ``fewstep_pcm50`` / ``fewstep_pcm40`` give the flow grids on the model's own shift,
and the LCM grids are refused there (discrete timesteps).
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
from ..samplers.parametrisation import is_flow
from . import engine
from .presets import log_kept_shift

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


def _grid_scheduler(grid, options, model_sampling, steps):
    if grid in schedules.VP_ONLY and is_flow(model_sampling):
        raise ValueError(f"fewstep scheduler: the {grid} grid places discrete (SD/SDXL) timesteps and this model is "
                         "flow matching; pick fewstep_trailing, fewstep_pcm50, simple or fewstep_auto")
    try:
        return schedules.grid_sigmas(grid, model_sampling, steps, **options)
    except ValueError as e:
        raise ValueError(f"fewstep scheduler: {e}{DENOISE_HINT}") from None


def settings_for_schedule(model_sampling) -> dict:
    """FewStep Settings' options on the model whose schedule the host is building (see ``schedule_context``)."""
    return schedule_context(model_sampling)[0]


def schedule_context(model_sampling) -> tuple[dict, bool]:
    """FewStep Settings' options on the model whose schedule the host is building.

    The host calls a scheduler with the model sampling object only (``KSampler.calculate_sigmas``,
    ``BasicScheduler``), while the settings live in the model patcher's ``model_options``; so the patcher is looked
    up in the calling frames: the nearest frame holding a patcher (or a ``comfy.samplers.KSampler``, through its
    ``model``) whose model sampling is this very object. Among several there (clones share their model sampling),
    the one carrying FewStep Settings. Returns (its settings, whether a node replaced its model sampling);
    ``({}, False)`` when none is found.
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
                found.append((consistency.settings({"model_options": patcher.model_options}),
                              "model_sampling" in patcher.object_patches))
        if found:
            return next((f for f in found if f[0]), found[0])
        frame = frame.f_back
    return {}, False


def _auto_scheduler(model_sampling, steps):
    settings, replaced = schedule_context(model_sampling)
    name = settings.get("preset")
    if not name:
        raise ValueError("KSampler scheduler 'fewstep_auto' needs a FewStep Settings node with a preset on the model")
    preset = preset_table.get_preset(name)
    if replaced and preset.flow:
        log_kept_shift("fewstep_auto scheduler", preset, model_sampling)
    try:
        sigmas = preset_table.preset_sigmas(preset, model_sampling, steps, base=settings.get("base", ""),
                                            keep_model_shift=replaced)
    except ValueError as e:
        hint = DENOISE_HINT if "steps" in str(e) and "is for" not in str(e) else ""
        raise ValueError(f"fewstep_auto scheduler (preset {name!r}): {e}{hint}") from None
    if preset.schedule == "fixed" and steps != len(sigmas) - 1:
        log.warning("fewstep_auto: preset %r always runs the timesteps %s; KSampler's steps (%d, or steps/denoise) "
                    "and denoise are not used", name, list(preset.fixed_timesteps), steps)
    return sigmas


#: dropdown name -> (grid of ``schedules.grid_sigmas``, its options)
SCHEDULERS = {
    "fewstep_lcm50": ("lcm", {"original_steps": 50}),
    "fewstep_lcm100": ("lcm", {"original_steps": 100}),
    "fewstep_lcm25": ("lcm", {"original_steps": 25}),
    "fewstep_pcm50": ("pcm", {"num_ddim_timesteps": 50}),
    "fewstep_pcm40": ("pcm", {"num_ddim_timesteps": 40}),
    "fewstep_trailing": ("trailing", {}),
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
    for name, (grid, options) in SCHEDULERS.items():
        csamplers.SCHEDULER_HANDLERS[name] = csamplers.SchedulerHandler(functools.partial(_grid_scheduler, grid,
                                                                                          options))
        _append(csamplers.SCHEDULER_NAMES, name)  # the same object as KSampler.SCHEDULERS
    csamplers.SCHEDULER_HANDLERS[AUTO] = csamplers.SchedulerHandler(_auto_scheduler)
    _append(csamplers.SCHEDULER_NAMES, AUTO)
