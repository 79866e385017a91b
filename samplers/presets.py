"""Frozen table of recommended settings per few-step LoRA / model family (from the model cards).

``sampler`` names a fewstep sampler ("lcm" = ``sample_lcm_exact``, "tcd" = ``sample_tcd`` with ``gamma``,
"pcm" = ``sample_pcm``, "euler" = deterministic Euler, which equals ``sample_consistency`` with gamma 0).
``schedule`` names a grid in ``samplers.schedules`` ("lcm", "tcd", "pcm", "trailing", "fixed").
``beta_schedule`` uses ComfyUI names ("linear" = diffusers "scaled_linear"); it records the card's schedule (the
nodes sample on whatever model sampling the model carries). PCM phase edges come from the training scripts' DDIM
solver size: ``num_ddim_timesteps`` (50, the SD1.5 scripts) or ``num_ddim_timesteps_sdxl`` (40, the SDXL script)
on an SDXL model; see ``solver_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "PRESETS", "PRESET_NAMES", "get_preset"]


@dataclass(frozen=True)
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
        Preset("LCM-LoRA", "lcm", "lcm", 1.0, "lcm", 4, 1.5, "1-2", note="2-8 steps work; negatives need cfg > 1."),
        Preset("TCD", "tcd", "tcd", 0.3, "tcd", 4, 1.0, "1 (diffusers guidance 0)",
               note="Raise gamma with more steps; diffusers pipelines default eta=0 unless passed."),
    ]
    for n in (2, 4, 8, 16):
        p.append(Preset(f"PCM smallcfg {n}-step", "pcm", "pcm", 0.0, "pcm", n, 1.0, "1-2", phases=n, num_ddim_timesteps=50,
                        num_ddim_timesteps_sdxl=40,
                        note="Phase edges of the training scripts: 50 DDIM timesteps on SD1.5, 40 on SDXL (= the "
                        "card's trailing grid)."))
    for n, cfg, rng in ((4, 3.0, "2.5-3.5"), (8, 4.5, "3-6"), (16, 4.5, "3-6 (card: 2-9 overall)")):
        p.append(Preset(f"PCM normalcfg {n}-step", "pcm", "pcm", 0.0, "pcm", n, cfg, rng, phases=n, num_ddim_timesteps=50,
                        num_ddim_timesteps_sdxl=40,
                        note="Use positive and negative prompts; phase edges of 50 DDIM timesteps on SD1.5, 40 on SDXL."
                        + (" Card gives no 16-step CFG; 8-step value reused." if n == 16 else "")))
    p.append(Preset("PCM LCM-like", "pcm", "lcm", 1.0, "lcm", 4, 1.5, "1-2", note="Card: use like LCM (any steps)."))
    for n in (1, 2, 4, 8):
        p.append(Preset(f"Hyper-SD {n}-step", "hyper-sd", "euler", 0.0, "trailing", n, 1.0, "1 (diffusers guidance 0)",
                        note="DDIM/Euler with trailing spacing; ~0.8 LoRA strength suggested in ComfyUI#2985."
                        + (" Hyper-SD's 1-step LoRA is the unified one: use 'Hyper-SD 1-step unified' for it."
                           if n == 1 else "")))
    for n in (8, 12):
        p.append(Preset(f"Hyper-SD CFG {n}-step", "hyper-sd", "euler", 0.0, "trailing", n, 5.0, "5-8",
                        note="CFG-preserved LoRA: use negative prompts."))
    p.append(Preset("Hyper-SD 1-step unified", "hyper-sd", "tcd", 1.0, "tcd", 1, 1.0, "1",
                    note="Unified LoRA works at 1-8 steps; lower gamma gives more detail at more steps."))
    p.append(Preset("Hyper-SDXL 1-step UNet", "hyper-sd", "lcm", 1.0, "fixed", 1, 1.0, "1", fixed_timesteps=(800,),
                    lora_strength=None, note="Full UNet, not a LoRA: a single step from t=800 (sigma 5.111)."))
    for n in (1, 2, 4, 8):
        p.append(Preset(f"SDXL-Lightning {n}-step", "lightning", "euler", 0.0, "trailing", n, 1.0, "1 (diffusers guidance 0)",
                        prediction="x0" if n == 1 else "",
                        note="Use the checkpoint/LoRA matching the step count."
                        + (" The 1-step model is x0-prediction ('sample') and experimental." if n == 1 else "")))
    p.append(Preset("AnimateLCM", "animatelcm", "lcm", 1.0, "lcm", 6, 1.5, "1-2", lora_strength=0.8,
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


def preset_key(name: str) -> str:
    """Stable snake_case key of a preset (the names ``lora.detect`` reports), e.g. 'PCM smallcfg 4-step' ->
    'pcm_smallcfg_4step', 'SDXL-Lightning 8-step' -> 'lightning_8step', 'LCM-LoRA' -> 'lcm'."""
    special = {"LCM-LoRA": "lcm", "PCM LCM-like": "pcm_lcmlike", "Hyper-SD 1-step unified": "hypersd_1step_unified",
               "Hyper-SDXL 1-step UNet": "hypersdxl_1step_unet"}
    if name in special:
        return special[name]
    key = name.lower().replace("sdxl-lightning", "lightning").replace("hyper-sd", "hypersd").replace("-step", "step")
    return key.replace(" ", "_").replace("-", "_")


PRESET_KEYS: dict[str, str] = {preset_key(p.name): p.name for p in PRESETS}


def get_preset_by_key(key: str) -> Preset:
    """The preset whose ``preset_key`` is ``key``; ``ValueError`` listing the valid keys otherwise."""
    if key not in PRESET_KEYS:
        raise ValueError(f"preset key {key!r} is unknown; valid keys: {', '.join(sorted(PRESET_KEYS))}")
    return _BY_NAME[PRESET_KEYS[key]]
