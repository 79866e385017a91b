"""KSampler dropdown entries: the pack's samplers and schedulers, registered in place and idempotently.

Documented names (never renamed, never shadowing a core name):

samplers   fewstep_lcm  fewstep_tcd  fewstep_pcm  fewstep_auto
schedulers fewstep_lcm50  fewstep_lcm100  fewstep_lcm25  fewstep_pcm50  fewstep_pcm40  fewstep_trailing  fewstep_auto

`fewstep_tcd` reads gamma (and final_step, noise device, batch offset) from the FewStep Settings model patch
at sample time. `fewstep_auto` sampler/scheduler follow the preset chosen in FewStep Settings.
"""
from __future__ import annotations

import functools
import logging

import comfy.k_diffusion.sampling as ksampling
import comfy.samplers as csamplers

from ..samplers import presets as preset_table
from ..samplers import schedules
from . import engine

log = logging.getLogger("fewstep")

SAMPLER_KINDS = {"fewstep_lcm": "lcm", "fewstep_tcd": "tcd", "fewstep_pcm": "pcm"}
AUTO = "fewstep_auto"
PRESET_ATTR = "fewstep_preset"  # set on a copy of model_sampling by FewStep Settings
BASE_ATTR = "fewstep_base"  # the model's base ("sdxl", "sd15", ...), set with PRESET_ATTR


def preset_kind(preset) -> str:
    return {"euler": "ddim"}.get(preset.sampler, preset.sampler)


def preset_timesteps(preset, steps: int, strength: float = 1.0, base: str = "") -> list[int]:
    """The preset's grid for `steps` (its own step count when steps <= 0) on a model of `base` ("sdxl", "sd15", ...;
    it picks PCM's solver size), cut for img2img `strength` by diffusers' rule for that grid: LCM/TCD cut the
    original grid before picking steps; trailing and PCM keep the last int(steps*strength) timesteps; a fixed grid
    (Hyper-SDXL 1-step UNet) has no img2img rule and refuses < 1."""
    n = preset.steps if steps <= 0 else steps
    if preset.schedule == "lcm":
        return schedules.lcm_timesteps(n, preset.original_steps, strength)
    if preset.schedule == "tcd":
        return schedules.tcd_timesteps(n, preset.original_steps, strength)
    if preset.schedule == "pcm":
        return schedules.strength_tail(schedules.pcm_phase_timesteps(n, preset.solver_steps(base)), strength)
    if preset.schedule == "trailing":
        return schedules.strength_tail(schedules.trailing_timesteps(n), strength)
    if preset.schedule == "fixed":
        if strength != 1.0:
            raise ValueError(f"preset {preset.name!r} runs the fixed timesteps {list(preset.fixed_timesteps)} and has "
                             f"no img2img rule; set strength to 1.0 or pick another preset")
        return list(preset.fixed_timesteps)
    raise ValueError(f"preset {preset.name!r} has unknown schedule {preset.schedule!r}")


def _auto_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
    settings = engine.settings_from_model(extra_args)
    name = settings.get("preset")
    if not name:
        raise ValueError("KSampler sampler 'fewstep_auto' needs a FewStep Settings node with a preset on the model; "
                         "add one, or pick fewstep_lcm / fewstep_tcd / fewstep_pcm")
    kind = preset_kind(preset_table.get_preset(name))
    if kind != "tcd" and "gamma" in settings:
        log.warning("fewstep_auto: preset %r samples with %s, which has no gamma; FewStep Settings' gamma %s is "
                    "not used (pick sampler fewstep_tcd to use it)", name, kind, settings["gamma"])
    return engine.fewstep_sample(model, x, sigmas, extra_args, callback, disable, kind=kind, **kw)


DENOISE_HINT = ("; with denoise below 1, KSampler asks the scheduler for int(steps / denoise) steps and runs the "
                "last `steps` of them: raise denoise, or for diffusers' img2img rule use SamplerCustom with a FewStep "
                "schedule node's strength/denoise input")


def _grid_scheduler(grid_fn, model_sampling, steps):
    try:
        return schedules.timesteps_to_sigmas(grid_fn(steps), model_sampling)
    except ValueError as e:
        raise ValueError(f"fewstep scheduler: {e}{DENOISE_HINT}") from None


def _auto_scheduler(model_sampling, steps):
    name = getattr(model_sampling, PRESET_ATTR, None)
    if not name:
        raise ValueError("KSampler scheduler 'fewstep_auto' needs a FewStep Settings node with a preset on the model")
    preset = preset_table.get_preset(name)
    try:
        timesteps = preset_timesteps(preset, steps, base=getattr(model_sampling, BASE_ATTR, ""))
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
    for name, kind in SAMPLER_KINDS.items():
        if not hasattr(ksampling, "sample_" + name):
            setattr(ksampling, "sample_" + name, functools.partial(engine.fewstep_sample, kind=kind))
    ksampling.sample_fewstep_auto = _auto_sampler
    for name in (*SAMPLER_KINDS, AUTO):
        _append(csamplers.KSAMPLER_NAMES, name)
        _append(csamplers.SAMPLER_NAMES, name)  # the same object as KSampler.SAMPLERS
    for name, grid in SCHEDULERS.items():
        csamplers.SCHEDULER_HANDLERS[name] = csamplers.SchedulerHandler(functools.partial(_grid_scheduler, grid))
        _append(csamplers.SCHEDULER_NAMES, name)  # the same object as KSampler.SCHEDULERS
    csamplers.SCHEDULER_HANDLERS[AUTO] = csamplers.SchedulerHandler(_auto_scheduler)
    _append(csamplers.SCHEDULER_NAMES, AUTO)
