"""Frozen table of recommended settings per few-step LoRA / model family (from the model cards).

``name`` is the one preset vocabulary: the preset widgets store it, ``lora.detect`` reports it. ``sampler`` is a key of
``samplers.SAMPLERS`` ("lcm", "tcd" with ``gamma``, "pcm" = the deterministic DDIM/Euler jump that PCM, Hyper-SD and
SDXL-Lightning sample with).
``schedule`` names a grid in ``samplers.schedules`` ("lcm", "tcd", "pcm", "trailing", "fixed").
``beta_schedule`` uses ComfyUI names ("linear" = diffusers "scaled_linear"); it records the card's schedule (the
nodes sample on whatever model sampling the model carries). PCM phase edges come from the training scripts' DDIM
solver size: ``num_ddim_timesteps`` (50, the SD1.5 scripts) or ``num_ddim_timesteps_sdxl`` (40, the SDXL script)
on an SDXL model; see ``solver_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import schedules

__all__ = ["Preset", "PRESETS", "PRESET_NAMES", "get_preset", "preset_timesteps"]


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    family: str
    sampler: str
    gamma: float
    schedule: str
    steps: int
    cfg: float
    cfg_range: str
    original_steps: int = 50
    phases: int | None = None
    num_ddim_timesteps: int | None = None
    num_ddim_timesteps_sdxl: int | None = None
    fixed_timesteps: tuple[int, ...] = ()
    lora_strength: float | None = 1.0
    beta_schedule: str = "linear"
    prediction: str = ""  # "x0" when the model card's checkpoint predicts x0 ("sample"); "" = the model's own
    note: str = ""

    def solver_steps(self, base: str = "") -> int:
        """PCM DDIM solver size for the model ``base`` ("sdxl", "sd15", ...; "" = unknown: the SD1.5 value)."""
        if base == "sdxl" and self.num_ddim_timesteps_sdxl:
            return self.num_ddim_timesteps_sdxl
        return self.num_ddim_timesteps or 50


def _build() -> tuple[Preset, ...]:
    p: list[Preset] = [
        Preset(name="LCM-LoRA", family="lcm", sampler="lcm", gamma=1.0, schedule="lcm", steps=4, cfg=1.5,
               cfg_range="1-2", note="2-8 steps work; negatives need cfg > 1."),
        Preset(name="TCD", family="tcd", sampler="tcd", gamma=0.3, schedule="tcd", steps=4, cfg=1.0,
               cfg_range="1 (diffusers guidance 0)",
               note="Raise gamma with more steps; diffusers pipelines default eta=0 unless passed."),
    ]
    for n in (2, 4, 8, 16):
        p.append(Preset(name=f"PCM smallcfg {n}-step", family="pcm", sampler="pcm", gamma=0.0, schedule="pcm", steps=n,
                        cfg=1.0, cfg_range="1-2", phases=n, num_ddim_timesteps=50, num_ddim_timesteps_sdxl=40,
                        note="Phase edges of the training scripts: 50 DDIM timesteps on SD1.5, 40 on SDXL (= the "
                        "card's trailing grid)."))
    for n, cfg, rng in ((4, 3.0, "2.5-3.5"), (8, 4.5, "3-6"), (16, 4.5, "3-6 (card: 2-9 overall)")):
        p.append(Preset(name=f"PCM normalcfg {n}-step", family="pcm", sampler="pcm", gamma=0.0, schedule="pcm",
                        steps=n, cfg=cfg, cfg_range=rng, phases=n, num_ddim_timesteps=50, num_ddim_timesteps_sdxl=40,
                        note="Use positive and negative prompts; phase edges of 50 DDIM timesteps on SD1.5, 40 on SDXL."
                        + (" Card gives no 16-step CFG; 8-step value reused." if n == 16 else "")))
    p.append(Preset(name="PCM LCM-like", family="pcm", sampler="lcm", gamma=1.0, schedule="lcm", steps=4, cfg=1.5,
                    cfg_range="1-2", note="Card: use like LCM (any steps)."))
    for n in (1, 2, 4, 8):
        p.append(Preset(name=f"Hyper-SD {n}-step", family="hyper-sd", sampler="pcm", gamma=0.0, schedule="trailing",
                        steps=n, cfg=1.0, cfg_range="1 (diffusers guidance 0)",
                        note="DDIM/Euler with trailing spacing; ~0.8 LoRA strength suggested in ComfyUI#2985."
                        + (" Hyper-SD's 1-step LoRA is the unified one: use 'Hyper-SD 1-step unified' for it."
                           if n == 1 else "")))
    for n in (8, 12):
        p.append(Preset(name=f"Hyper-SD CFG {n}-step", family="hyper-sd", sampler="pcm", gamma=0.0, schedule="trailing",
                        steps=n, cfg=5.0, cfg_range="5-8", note="CFG-preserved LoRA: use negative prompts."))
    p.append(Preset(name="Hyper-SD 1-step unified", family="hyper-sd", sampler="tcd", gamma=1.0, schedule="tcd",
                    steps=1, cfg=1.0, cfg_range="1",
                    note="Unified LoRA works at 1-8 steps; lower gamma gives more detail at more steps."))
    p.append(Preset(name="Hyper-SDXL 1-step UNet", family="hyper-sd", sampler="lcm", gamma=1.0, schedule="fixed",
                    steps=1, cfg=1.0, cfg_range="1", fixed_timesteps=(800,), lora_strength=None,
                    note="Full UNet, not a LoRA: a single step from t=800 (sigma 5.111)."))
    for n in (1, 2, 4, 8):
        p.append(Preset(name=f"SDXL-Lightning {n}-step", family="lightning", sampler="pcm", gamma=0.0,
                        schedule="trailing", steps=n, cfg=1.0, cfg_range="1 (diffusers guidance 0)",
                        prediction="x0" if n == 1 else "",
                        note="Use the checkpoint/LoRA matching the step count."
                        + (" The 1-step model is x0-prediction ('sample') and experimental." if n == 1 else "")))
    p.append(Preset(name="AnimateLCM", family="animatelcm", sampler="lcm", gamma=1.0, schedule="lcm", steps=6, cfg=1.5,
                    cfg_range="1-2", lora_strength=0.8,
                    note="4 steps work, 6-8 better. Reference config is sqrt_linear with 100 original steps; "
                    "ADE's default 'lcm' (linear, 50) is used here since it flickers less."))
    return tuple(p)


PRESETS: tuple[Preset, ...] = _build()
PRESET_NAMES: tuple[str, ...] = tuple(p.name for p in PRESETS)
_BY_NAME = {p.name: p for p in PRESETS}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"preset name {name!r} is unknown; valid names: {', '.join(PRESET_NAMES)}") from None


def preset_timesteps(preset: Preset, steps: int, strength: float = 1.0, base: str = "") -> list[int]:
    """The preset's grid for ``steps`` (its own step count when steps <= 0) on a model of ``base`` ("sdxl", "sd15",
    ...; it picks PCM's solver size), cut for img2img ``strength`` by diffusers' rule for that grid: LCM/TCD cut the
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
