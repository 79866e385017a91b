"""Frozen table of recommended settings per few-step LoRA / model (from the model cards), SD and flow-matching.

``name`` is the one preset vocabulary: the preset widgets store it, ``lora.detect`` reports it. ``sampler`` is a key of
``samplers.SAMPLERS`` ("lcm", "tcd" with ``gamma``, "pcm" = the deterministic DDIM/Euler jump that PCM, Hyper-SD,
SDXL-Lightning and the flow Euler recipes sample with).
``schedule`` names a grid of ``samplers.schedules.grid_sigmas`` ("lcm", "tcd", "pcm", "trailing", "fixed", "turbo";
on flow models "trailing", "simple", "flowmatch", "pcm"), realised on the model's own kind of noise schedule.
``beta_schedule`` uses ComfyUI names ("linear" = diffusers "scaled_linear"); it records the card's schedule (the
nodes sample on whatever model sampling the model carries). PCM phase edges come from the training scripts' DDIM
solver size: ``num_ddim_timesteps`` (50, the SD1.5 scripts and PCM's SD3 flow schedulers) or
``num_ddim_timesteps_sdxl`` (40, the SDXL script) on an SDXL model; see ``solver_steps``.

Fields the flow-matching cards add:

* ``bases``: the model families the LoRA/model is for (``nodes.common.model_base`` strings: "sd3", "flux", "wan",
  "qwen_image", "hunyuan_video", "sdxl", ...); empty = any SD-family (discrete VP) model. A preset used on another
  family is an error naming both (``check_base``).
* ``shift``: the card's flow shift, ``sigma = shift*u / (1 + (shift - 1)*u)`` as core ``ModelSamplingSD3`` /
  ``ModelSamplingAuraFlow`` set it; ``None`` = the model's own (Flux: resolution-dependent, ``ModelSamplingFlux``).
  ``preset_sigmas`` places the grid with this shift on the model's timestep scale, unless told to keep the model's
  own (the nodes do that when a ModelSampling* node sits upstream: the user's choice wins). The shift only moves the
  grid: the model is conditioned on ``k*sigma`` whatever the shift, so this equals running the core node.
* ``guidance``: the distilled-guidance value (Flux's FluxGuidance, HunyuanVideo's embedded guidance); ``cfg`` stays
  the real classifier-free guidance scale (1 = off).
* ``expert_split``: two-expert models (Wan 2.2 A14B): the fraction of the steps the high-noise expert runs;
  ``preset_boundary(preset, steps)`` gives the step index where the low-noise expert takes over.
* ``source``: the public card / repository files the numbers come from.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import flow, schedules
from .parametrisation import is_flow

__all__ = ["Preset", "PRESETS", "PRESET_NAMES", "FLOW_BASES", "SD_BASES", "get_preset", "preset_timesteps",
           "preset_sigmas", "check_base", "preset_boundary", "preset_shift"]

FLOW_BASES = ("sd3", "flux", "wan", "wan22_5b", "qwen_image", "hunyuan_video")
SD_BASES = ("sd15", "sd2", "sdxl", "ssd1b")
BASE_NAMES = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL", "ssd1b": "SSD-1B", "sd3": "SD3", "flux": "FLUX.1",
              "wan": "Wan 2.1 / Wan 2.2 A14B", "wan22_5b": "Wan 2.2 TI2V-5B", "qwen_image": "Qwen-Image",
              "hunyuan_video": "HunyuanVideo"}
#: Families whose img2img (video2video) pipeline keeps int(n*strength) steps (diffusers WanVideoToVideoPipeline).
IMG2IMG_INT_BASES = ("wan", "wan22_5b")


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
    bases: tuple[str, ...] = ()
    shift: float | None = None
    guidance: float | None = None
    expert_split: float | None = None
    source: str = ""
    note: str = ""

    @property
    def flow(self) -> bool:
        """Whether the preset is for flow-matching models."""
        return any(b in FLOW_BASES for b in self.bases)

    def solver_steps(self, base: str = "") -> int:
        """PCM DDIM solver size for the model ``base`` ("sdxl", "sd15", ...; "" = unknown: the SD1.5 value)."""
        if base == "sdxl" and self.num_ddim_timesteps_sdxl:
            return self.num_ddim_timesteps_sdxl
        return self.num_ddim_timesteps or 50


def _sd_presets() -> list[Preset]:
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
    return p


def _sd_card_presets() -> list[Preset]:
    """The SD/SDXL distillations whose cards give a fixed recipe (added with the flow presets)."""
    turbo = ("Full checkpoint, guidance 0 (cfg 1), 1-4 steps on SDTurboScheduler's 999, 899, ... grid; ComfyUI's "
             "example samples with euler_ancestral, fewstep with its LCM step (x0 re-noised to the next point): "
             "the same at 1 step.")
    return [
        Preset(name="DMD2 4-step", family="dmd2", sampler="lcm", gamma=1.0, schedule="fixed", steps=4, cfg=1.0,
               cfg_range="1 (card guidance 0); community 1-1.8", fixed_timesteps=(999, 749, 499, 249),
               bases=("sdxl",), source="tianweiy/DMD2 README (4-step LoRA: LCMScheduler, timesteps 999/749/499/249, "
               "guidance_scale 0, fuse_lora(lora_scale=1.0))",
               note="Community workflows use 0.7-1.0 LoRA strength with the lcm sampler."),
        Preset(name="SDXL-Turbo", family="turbo", sampler="lcm", gamma=1.0, schedule="turbo", steps=1, cfg=1.0,
               cfg_range="1 (card guidance 0)", lora_strength=None, bases=("sdxl",),
               source="stabilityai/sdxl-turbo card; comfyanonymous/ComfyUI_examples sdturbo (SDTurboScheduler)",
               note=turbo),
        Preset(name="SD-Turbo", family="turbo", sampler="lcm", gamma=1.0, schedule="turbo", steps=1, cfg=1.0,
               cfg_range="1 (card guidance 0)", lora_strength=None, bases=("sd2",),
               source="stabilityai/sd-turbo card; comfyanonymous/ComfyUI_examples sdturbo (SDTurboScheduler)",
               note=turbo),
        Preset(name="Flash Diffusion SDXL 4-step", family="flash", sampler="lcm", gamma=1.0, schedule="trailing",
               steps=4, cfg=1.0, cfg_range="1 (card guidance 0)", bases=("sdxl",),
               source="jasperai/flash-sdxl card (LCMScheduler with timestep_spacing='trailing', 4 steps, "
               "guidance_scale 0)",
               note="LCM step on the trailing grid 999/749/499/249. diffusers' LCMScheduler ignores "
               "timestep_spacing, so the card's own snippet runs the LCM grid 999/759/499/259 instead."),
    ]


def _flow_presets() -> list[Preset]:
    hyper = ("ByteDance/Hyper-SD README: LoRA scale 0.125; SD3 CFG LoRAs at guidance 3.0/5.0/7.0 for 4/8/16 steps "
             "on StableDiffusion3Pipeline's default FlowMatchEulerDiscreteScheduler (shift 3); FLUX LoRAs at "
             "guidance 3.5 on FluxPipeline")
    pcm = "G-U-N/Phased-Consistency-Model code/text_to_image_sd3: sd3_test.py (guidance 1.2, 4 steps), "
    p = [Preset(name=f"Hyper-SD3 {n}-step", family="hyper-sd", sampler="pcm", gamma=0.0, schedule="flowmatch",
                steps=n, cfg=cfg, cfg_range=f"{cfg:g} (card)", lora_strength=0.125, bases=("sd3",), shift=3.0,
                source=hyper, note="Euler on diffusers' FlowMatch grid."
                + (f" The card says the {n}-step LoRA also runs at {n * 3 // 4} steps." if n > 4 else ""))
         for n, cfg in ((4, 3.0), (8, 5.0), (16, 7.0))]
    p += [
        Preset(name="PCM-SD3 4-step", family="pcm", sampler="pcm", gamma=0.0, schedule="pcm", steps=4, cfg=1.2,
               cfg_range="1.2 (card script)", phases=4, num_ddim_timesteps=50, bases=("sd3",), shift=3.0,
               source=pcm + "pcm_fm_deterministic_scheduler.py (Euler on the 50-point shifted grid)",
               note="pcm_deterministic_4step_shift3; for the shift-1 files put ModelSamplingSD3 (shift 1) before "
               "the sampler nodes: a ModelSampling node upstream is always used."),
        Preset(name="PCM-SD3 stochastic 4-step", family="pcm", sampler="lcm", gamma=1.0, schedule="pcm", steps=4,
               cfg=1.2, cfg_range="1.2 (card script)", phases=4, num_ddim_timesteps=50, bases=("sd3",), shift=3.0,
               source=pcm + "pcm_fm_stochastic_scheduler.py (x0 re-noised to the next point: the LCM step)",
               note="pcm_stochastic_shift3."),
    ]
    p += [Preset(name=f"Hyper-FLUX {n}-step", family="hyper-sd", sampler="pcm", gamma=0.0, schedule="trailing",
                 steps=n, cfg=1.0, cfg_range="1 (FLUX.1-dev is guidance-distilled)", lora_strength=0.125,
                 bases=("flux",), guidance=3.5, source=hyper,
                 note="Guidance 3.5 goes to FluxGuidance; the shift is the model's (ModelSamplingFlux with your "
                 "width/height, as FluxPipeline's resolution-dependent shift).") for n in (8, 16)]
    p += [
        Preset(name="FLUX.1 Turbo-Alpha 8-step", family="turbo-alpha", sampler="pcm", gamma=0.0, schedule="trailing",
               steps=8, cfg=1.0, cfg_range="1 (FLUX.1-dev is guidance-distilled)", bases=("flux",), guidance=3.5,
               source="alimama-creative/FLUX.1-Turbo-Alpha card (8 steps, guidance 3.5, LoRA 1.0, FluxPipeline)",
               note="Guidance 3.5 goes to FluxGuidance; the shift is the model's (ModelSamplingFlux)."),
        Preset(name="Wan 2.1 lightx2v 4-step", family="lightx2v", sampler="lcm", gamma=1.0, schedule="trailing",
               steps=4, cfg=1.0, cfg_range="1 (CFG-distilled)", bases=("wan",), shift=5.0,
               source="ModelTC/LightX2V configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json (steps "
               "1000/750/500/250, sample_shift 5, enable_cfg false, LoRA 1.0) and its WanStepDistillScheduler "
               "(x0 re-noised to the next point: the LCM step)"),
        Preset(name="Wan 2.1 CausVid", family="causvid", sampler="lcm", gamma=1.0, schedule="trailing", steps=4,
               cfg=1.0, cfg_range="1 (community: up to ~3 for negatives)", lora_strength=0.9, bases=("wan",),
               shift=8.0, source="tianweiy/CausVid configs/wan_causal_dmd_warp_4step_cfg2.yaml (DMD generator, steps "
               "1000/750/500/250 warped with shift 8); LoRA strength and cfg from community workflows "
               "(scrapbox work4ai/CausVid)",
               note="LoRA ~0.3 at ~12 steps keeps more motion; 0.9 at 4 steps is the fast setting."),
        Preset(name="Wan 2.2 Lightning 4-step", family="lightning", sampler="pcm", gamma=0.0, schedule="trailing",
               steps=4, cfg=1.0, cfg_range="1 (CFG-distilled)", bases=("wan",), shift=5.0, expert_split=0.5,
               source="lightx2v/Wan2.2-Lightning card and workflows (two KSamplerAdvanced: high-noise expert steps "
               "0-2, low-noise 2-4, euler, simple, cfg 1, shift 5); ModelTC/LightX2V "
               "configs/distill/wan22/wan_moe_t2v_distill_lora.json (boundary_step_index 2) and its "
               "Wan22StepDistillScheduler (Euler)",
               note="One two-expert run: the high-noise model for the first half of the steps (timesteps 1000, "
               "937.5), the low-noise model for the rest (833.3, 625); LoRA 1.0 on each expert."),
    ]
    p += [Preset(name=f"Qwen-Image-Lightning {n}-step", family="lightning", sampler="pcm", gamma=0.0,
                 schedule="trailing", steps=n, cfg=1.0, cfg_range="1 (CFG-distilled)", bases=("qwen_image",),
                 shift=3.0, source=f"ModelTC/Qwen-Image-Lightning workflows/qwen-image-{n}steps.json "
                 "(LoraLoaderModelOnly 1.0, ModelSamplingAuraFlow shift 3, euler, simple, cfg 1) and README "
                 "(FlowMatchEulerDiscreteScheduler, exponential shift log(3) = shift 3)") for n in (4, 8)]
    p.append(Preset(name="HunyuanVideo FastVideo", family="fastvideo", sampler="pcm", gamma=0.0, schedule="trailing",
                    steps=6, cfg=1.0, cfg_range="1 (guidance 1; embedded guidance 6)", bases=("hunyuan_video",),
                    shift=17.0, guidance=6.0,
                    source="hao-ai-lab/FastVideo scripts/inference (FastHunyuan: 6 steps, flow-shift 17, "
                    "guidance-scale 1, embedded-cfg-scale 6); kijai/ComfyUI-HunyuanVideoWrapper issue 159 "
                    "(FastVideo LoRA: 4-8 steps, shift 15-17)",
                    note="Embedded guidance 6 goes to the conditioning's guidance (FluxGuidance / "
                    "HunyuanVideo's text encode node)."))
    return p


PRESETS: tuple[Preset, ...] = (*_sd_presets(), *_sd_card_presets(), *_flow_presets())
PRESET_NAMES: tuple[str, ...] = tuple(p.name for p in PRESETS)
_BY_NAME = {p.name: p for p in PRESETS}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"preset name {name!r} is unknown; valid names: {', '.join(PRESET_NAMES)}") from None


def preset_timesteps(preset: Preset, steps: int, strength: float = 1.0, base: str = "") -> list[int]:
    """Discrete-VP presets only (flow presets: ``preset_sigmas``). The preset's grid for ``steps`` (its own step count
    when steps <= 0) on a model of ``base`` ("sdxl", "sd15", ...; it picks PCM's solver size), cut for img2img
    ``strength`` by diffusers' rule for that grid: LCM/TCD cut the original grid before picking steps; trailing and PCM
    keep the last int(steps*strength) timesteps; SD-Turbo's grid starts 10 - int(10*strength) entries in; a fixed grid
    (Hyper-SDXL 1-step UNet, DMD2) has no img2img rule and refuses < 1."""
    if preset.flow:
        raise ValueError(f"preset {preset.name!r} is for flow-matching models: its grid is placed in sigmas "
                         "(preset_sigmas), not in discrete timesteps")
    return _vp_timesteps(preset, steps, strength, base)


def _vp_timesteps(preset: Preset, steps: int, strength: float, base: str) -> list[int]:
    """The VP grid of ``preset_timesteps``."""
    n = preset.steps if steps <= 0 else steps
    if preset.schedule == "lcm":
        return schedules.lcm_timesteps(n, preset.original_steps, strength)
    if preset.schedule == "tcd":
        return schedules.tcd_timesteps(n, preset.original_steps, strength)
    if preset.schedule == "pcm":
        return schedules.strength_tail(schedules.pcm_phase_timesteps(n, preset.solver_steps(base)), strength)
    if preset.schedule == "trailing":
        return schedules.strength_tail(schedules.trailing_timesteps(n), strength)
    if preset.schedule == "turbo":
        return schedules.turbo_timesteps(n, strength)
    if preset.schedule == "fixed":
        if strength != 1.0:
            raise ValueError(f"preset {preset.name!r} runs the fixed timesteps {list(preset.fixed_timesteps)} and has "
                             f"no img2img rule; set strength to 1.0 or pick another preset")
        return list(preset.fixed_timesteps)
    raise ValueError(f"preset {preset.name!r} has unknown schedule {preset.schedule!r}")


def _describe(bases) -> str:
    return " / ".join(f"{BASE_NAMES.get(b, b)} ('{b}')" for b in bases)


def check_base(preset: Preset, base: str = "", model_sampling=None) -> None:
    """``ValueError`` naming both when ``preset`` is used on a model it is not for: by the model's family ``base``
    (``nodes.common.model_base``; "" or "unknown" = not known) and by its kind (flow matching or discrete VP, from
    ``model_sampling`` when given)."""
    flow_model = is_flow(model_sampling) if model_sampling is not None else base in FLOW_BASES
    wanted = _describe(preset.bases) if preset.bases else "SD-family (discrete VP: SD1.5 / SD2 / SDXL)"
    known = base in FLOW_BASES or base in SD_BASES
    if preset.bases and known and base not in preset.bases:
        got = f"{BASE_NAMES[base]} ('{base}')"
    elif preset.flow != flow_model or (not preset.bases and base in FLOW_BASES):
        got = (f"{BASE_NAMES[base]} ('{base}'), " if known else "") + \
            ("a flow-matching model" if flow_model else "a discrete VP (SD-family) model")
    else:
        return
    raise ValueError(f"preset {preset.name!r} is for {wanted} models, but this model is {got}: pick a preset made "
                     "for this model, or load the model the LoRA was made for")


def preset_shift(preset: Preset, model_sampling, keep_model_shift: bool = False):
    """The model sampling a flow preset's grid is placed on: ``model_sampling`` itself when the preset has no shift,
    when ``keep_model_shift`` (a ModelSampling* node upstream: the user's choice); else a twin with the preset's shift on the model's timestep scale (``samplers.flow.with_shift``)."""
    if not preset.flow or preset.shift is None or keep_model_shift:
        return model_sampling
    return flow.with_shift(model_sampling, preset.shift)


def preset_sigmas(preset: Preset, model_sampling, steps: int = 0, strength: float = 1.0, base: str = "", *,
                  keep_model_shift: bool = False):
    """SIGMAS of ``preset`` for ``steps`` (its own count when <= 0) on ``model_sampling`` (host object or twin), cut
    for img2img ``strength`` by the card pipeline's rule, after ``check_base``. Flow presets are placed with the
    preset's shift (``preset_shift``; ``keep_model_shift`` keeps the model's); discrete-VP presets through
    ``preset_timesteps``."""
    check_base(preset, base, model_sampling)
    if not preset.flow:
        return schedules.timesteps_to_sigmas(preset_timesteps(preset, steps, strength, base), model_sampling).cpu()
    n = preset.steps if steps <= 0 else steps
    ms = preset_shift(preset, model_sampling, keep_model_shift)
    return schedules.grid_sigmas(preset.schedule, ms, n, strength, num_ddim_timesteps=preset.solver_steps(base),
                                 timesteps=", ".join(str(t) for t in preset.fixed_timesteps),
                                 img2img="int" if base in IMG2IMG_INT_BASES else "flow")


def preset_boundary(preset: Preset, steps: int = 0) -> int | None:
    """Two-expert presets (Wan 2.2 A14B): the step index at which the low-noise expert takes over for a run of
    ``steps`` steps (its own count when <= 0) -- the high-noise expert runs steps ``[0, b)``, the low-noise one
    ``[b, steps)``, e.g. 2 of 4 for Wan 2.2 Lightning. ``None`` for single-model presets."""
    if preset.expert_split is None:
        return None
    n = preset.steps if steps <= 0 else steps
    if n < 2:
        raise ValueError(f"preset {preset.name!r} runs two experts and needs at least 2 steps, got {n}")
    return min(n - 1, max(1, int(n * preset.expert_split + 0.5)))
