"""Schedules and presets on flow-matching models, host-free (the twins of the host's model samplings)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.samplers import SAMPLERS, flow, schedules
from fewstep.samplers import presets as P
from fewstep.samplers.discrete import DiscreteSchedule


def host_simple(ms, steps):
    """comfy.samplers.simple_scheduler, written out."""
    ss = len(ms.sigmas) / steps
    return [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


@pytest.mark.parametrize("ms", [flow.FlowSchedule(3.0), flow.FlowSchedule(5.0), flow.FlowSchedule(3.0, multiplier=1),
                                flow.FluxSchedule(1.15)], ids=["sd3", "wan5", "aura3", "flux"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8])
def test_simple_is_the_hosts_and_trailing_its_exact_grid(ms, steps):
    assert schedules.grid_sigmas("simple", ms, steps).tolist() == host_simple(ms, steps)
    trailing = schedules.grid_sigmas("trailing", ms, steps)
    u = torch.tensor([1 - k / steps for k in range(steps)], dtype=torch.float64)
    torch.testing.assert_close(trailing[:-1].double(), ms.sigma(u * flow.timestep_scale(ms)).double(),
                               rtol=0, atol=1e-7)
    if 1000 % steps == 0 and isinstance(ms, flow.FlowSchedule):  # the same grid up to the table's float32 rounding
        torch.testing.assert_close(trailing, schedules.grid_sigmas("simple", ms, steps), rtol=0, atol=1e-7)


def test_wan22_lightning_timesteps_are_simple_with_shift_5():
    """The trained timesteps 1000, 937.5, 833.3, 625 (sigma*1000) are the shift-5 grid at 4 steps."""
    ms = flow.FlowSchedule(5.0)
    for grid in ("simple", "trailing"):
        torch.testing.assert_close(schedules.grid_sigmas(grid, ms, 4) * 1000,
                                   torch.tensor([1000, 937.5, 2500 / 3, 625, 0]), rtol=0, atol=1e-4)
    fixed = schedules.grid_sigmas("fixed", ms, timesteps="1000, 937.5, 833.3, 625")
    assert fixed.tolist() == pytest.approx([1.0, 0.9375, 0.8333, 0.625, 0.0], abs=1e-7)
    assert fixed.tolist() == schedules.grid_sigmas("fixed", flow.FlowSchedule(1.0), timesteps="1000 937.5 833.3 "
                                                   "625").tolist()  # placed whatever the shift


@pytest.mark.parametrize("phases, want_t", [(1, [1000]), (2, [1000, 500]), (4, [1000, 760, 500, 260]),
                                            (8, [1000, 880, 760, 640, 500, 380, 260, 140])])
def test_pcm_flow_grid(phases, want_t):
    """PCM's flow schedulers: the 1000 shifted sigmas at t = 1000 - 20k, picked at floor(linspace(0, 50, N))."""
    u = flow.grid_fractions("pcm", phases)
    assert [round(x * 1000) for x in u] == want_t
    # the reference's construction, written out: shifted table, euler_timesteps, reversed, indexed
    shift = 3.0
    table = np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy() / 1000
    table = shift * table / (1 + (shift - 1) * table)
    euler = (np.arange(1, 51) * 20).round().astype(np.int64) - 1
    grid = table[::-1][euler][::-1]
    ref = grid[np.floor(np.linspace(0, 50, num=phases, endpoint=False)).astype(np.int64)]
    got = schedules.grid_sigmas("pcm", flow.FlowSchedule(shift), phases)
    torch.testing.assert_close(got[:-1], torch.from_numpy(ref.astype(np.float32)), rtol=0, atol=1e-6)
    if phases == 4:
        assert got.tolist() == pytest.approx([1.0, 0.9048, 0.75, 0.5132, 0.0], abs=1e-4)


def test_flowmatch_grid_shifts_its_end_point_twice():
    """diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(N): linspace(1, sigma_min) with sigma_min already
    shifted, then shifted again (what the SD3 pipeline, Hyper-SD3's card, runs)."""
    ms = flow.FlowSchedule(3.0)
    end = 3 * 0.001 / (1 + 2 * 0.001)
    u = np.linspace(1.0, end, 4)
    want = 3 * u / (1 + 2 * u)
    assert schedules.grid_sigmas("flowmatch", ms, 4)[:-1].tolist() == pytest.approx(want.tolist(), abs=1e-7)
    assert flow.grid_fractions("flowmatch", 1, ms) == [1.0]


@pytest.mark.parametrize("n, strength, keep", [(4, 1.0, 4), (4, 0.5, 2), (4, 0.3, 2), (4, 0.2, 1), (8, 0.6, 5),
                                              (3, 0.34, 2), (10, 0.7, 7)])
def test_flow_img2img_rule_is_the_sd3_flux_pipelines(n, strength, keep):
    """diffusers' SD3/Flux/Qwen img2img: init = min(n*s, n); t_start = int(max(n - init, 0)) -- not SD's int(n*s)."""
    assert flow.strength_keep(n, strength) == keep == n - int(max(n - min(n * strength, n), 0))
    if int(n * strength) >= 1:  # Wan's video2video rule
        assert flow.strength_keep(n, strength, "int") == min(int(n * strength), n)
    full = schedules.grid_sigmas("trailing", flow.FlowSchedule(3.0), n)
    assert torch.equal(schedules.grid_sigmas("trailing", flow.FlowSchedule(3.0), n, strength), full[n - keep:])
    with pytest.raises(ValueError, match="keeps none"):
        flow.strength_keep(4, 0.1, "int")


def test_grid_errors_name_the_fix():
    ms = flow.FlowSchedule(3.0)
    for grid in ("lcm", "tcd", "turbo"):
        with pytest.raises(ValueError, match=f"the '{grid}' grid places discrete .* trailing, simple, flowmatch"):
            schedules.grid_sigmas(grid, ms, 4)
    with pytest.raises(ValueError, match="flowmatch grid .* is for flow-matching models"):
        schedules.grid_sigmas("flowmatch", DiscreteSchedule(), 4)
    with pytest.raises(ValueError, match=r"sigma\*1000, in \(0, 1000\]"):
        schedules.grid_sigmas("fixed", ms, timesteps="1200, 500")
    with pytest.raises(ValueError, match="strictly descending"):
        schedules.grid_sigmas("fixed", ms, timesteps="500, 700")
    with pytest.raises(ValueError, match="no img2img rule"):
        schedules.grid_sigmas("fixed", ms, strength=0.5, timesteps="1000, 500")
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.grid_sigmas("karras", ms, 4)
    with pytest.raises(ValueError, match="steps must be an int in"):
        schedules.grid_sigmas("pcm", ms, 51)


def test_turbo_grid_is_core_sdturboscheduler():
    """ComfyUI's SDTurboScheduler: flip(arange(1, 11) * 100 - 1)[10 - int(10*denoise):][:steps]."""
    full = (np.arange(1, 11) * 100 - 1)[::-1]
    for steps in (1, 2, 4):
        for denoise in (1.0, 0.5, 0.75):
            start = 10 - int(10 * denoise)
            assert schedules.turbo_timesteps(steps, denoise) == [int(t) for t in full[start:start + steps]]
    with pytest.raises(ValueError, match="steps must be an int in"):
        schedules.turbo_timesteps(11)


FLOW_NAMES = ["Hyper-SD3 4-step", "Hyper-SD3 8-step", "Hyper-SD3 16-step", "PCM-SD3 4-step",
              "PCM-SD3 stochastic 4-step", "Hyper-FLUX 8-step", "Hyper-FLUX 16-step", "FLUX.1 Turbo-Alpha 8-step",
              "Wan 2.1 lightx2v 4-step", "Wan 2.1 CausVid", "Wan 2.2 Lightning 4-step", "Qwen-Image-Lightning 4-step",
              "Qwen-Image-Lightning 8-step", "HunyuanVideo FastVideo"]
SD_CARD_NAMES = ["DMD2 4-step", "SDXL-Turbo", "SD-Turbo", "Flash Diffusion SDXL 4-step"]


def _twin(base):
    if base in ("flux", "qwen_image"):
        return flow.FluxSchedule(1.15)  # the host loads Qwen-Image with ModelSamplingFlux too
    if base in P.FLOW_BASES:
        return flow.FlowSchedule({"sd3": 3.0, "wan": 8.0, "hunyuan_video": 7.0}[base])
    return DiscreteSchedule()


def test_every_new_preset_exists_with_its_card_fields():
    for name in FLOW_NAMES + SD_CARD_NAMES:
        p = P.get_preset(name)
        assert p.bases and p.source and p.sampler in SAMPLERS and p.schedule in schedules.GRIDS, name
        assert p.flow == (name in FLOW_NAMES), name
    card = {  # name: (lora strength, cfg, guidance, shift, steps, sampler)
        "Hyper-SD3 4-step": (0.125, 3.0, None, 3.0, 4, "pcm"), "Hyper-SD3 8-step": (0.125, 5.0, None, 3.0, 8, "pcm"),
        "Hyper-SD3 16-step": (0.125, 7.0, None, 3.0, 16, "pcm"), "PCM-SD3 4-step": (1.0, 1.2, None, 3.0, 4, "pcm"),
        "PCM-SD3 stochastic 4-step": (1.0, 1.2, None, 3.0, 4, "lcm"),
        "Hyper-FLUX 8-step": (0.125, 1.0, 3.5, None, 8, "pcm"), "Hyper-FLUX 16-step": (0.125, 1.0, 3.5, None, 16, "pcm"),
        "FLUX.1 Turbo-Alpha 8-step": (1.0, 1.0, 3.5, None, 8, "pcm"),
        "Wan 2.1 lightx2v 4-step": (1.0, 1.0, None, 5.0, 4, "lcm"), "Wan 2.2 Lightning 4-step": (1.0, 1.0, None, 5.0, 4,
                                                                                             "pcm"),
        "Qwen-Image-Lightning 4-step": (1.0, 1.0, None, 3.0, 4, "pcm"),
        "Qwen-Image-Lightning 8-step": (1.0, 1.0, None, 3.0, 8, "pcm"),
        "HunyuanVideo FastVideo": (1.0, 1.0, 6.0, 17.0, 6, "pcm"), "DMD2 4-step": (1.0, 1.0, None, None, 4, "lcm"),
        "SDXL-Turbo": (None, 1.0, None, None, 1, "lcm"),
    }
    for name, want in card.items():
        p = P.get_preset(name)
        assert (p.lora_strength, p.cfg, p.guidance, p.shift, p.steps, p.sampler) == want, name


@pytest.mark.parametrize("name", FLOW_NAMES + SD_CARD_NAMES)
def test_every_new_preset_gives_sigmas_on_its_family(name):
    p = P.get_preset(name)
    base = p.bases[0]
    sig = P.preset_sigmas(p, _twin(base), 0, 1.0, base)
    assert len(sig) == p.steps + 1 and float(sig[-1]) == 0.0 and bool((sig[1:] < sig[:-1]).all())
    if p.flow:
        assert float(sig[0]) == pytest.approx(1.0)
        if p.shift is not None:  # placed with the card's shift, not the model's default
            assert torch.allclose(sig, P.preset_sigmas(p, flow.FlowSchedule(p.shift), 0, 1.0, base), atol=1e-7)
        wrong = next(b for b in P.FLOW_BASES + ("sdxl",) if b not in p.bases)
        with pytest.raises(ValueError, match=f"preset '{name}' is for .*'{base}'.* but this model is .*'{wrong}'"):
            P.preset_sigmas(p, _twin(wrong), 0, 1.0, wrong)


def test_card_grids():
    w = P.preset_sigmas(P.get_preset("Wan 2.2 Lightning 4-step"), flow.FlowSchedule(8.0), base="wan")
    assert (w * 1000).tolist() == pytest.approx([1000, 937.5, 2500 / 3, 625, 0], abs=1e-3)
    lx = P.preset_sigmas(P.get_preset("Wan 2.1 lightx2v 4-step"), flow.FlowSchedule(8.0), base="wan")
    assert torch.equal(lx, w)
    pcm = P.preset_sigmas(P.get_preset("PCM-SD3 4-step"), flow.FlowSchedule(3.0), base="sd3")
    assert pcm.tolist() == pytest.approx([1.0, 0.9048, 0.75, 0.5132, 0.0], abs=1e-4)
    q = P.preset_sigmas(P.get_preset("Qwen-Image-Lightning 8-step"), flow.FluxSchedule(1.15), base="qwen_image")
    aura = schedules.grid_sigmas("simple", flow.FlowSchedule(3.0, multiplier=1), 8)  # the card's workflow
    torch.testing.assert_close(q, aura, rtol=0, atol=1e-7)
    dmd = P.preset_sigmas(P.get_preset("DMD2 4-step"), DiscreteSchedule(), base="sdxl")
    assert DiscreteSchedule().timestep(dmd[:-1]).tolist() == [999, 749, 499, 249]
    flash = P.preset_timesteps(P.get_preset("Flash Diffusion SDXL 4-step"), 0)
    assert flash == [999, 749, 499, 249]
    assert P.preset_timesteps(P.get_preset("SD-Turbo"), 4) == [999, 899, 799, 699]


def test_user_shift_is_kept_when_asked_and_flux_presets_keep_the_models():
    p = P.get_preset("Qwen-Image-Lightning 4-step")
    user = flow.FlowSchedule(2.0, multiplier=1)
    kept = P.preset_sigmas(p, user, base="qwen_image", keep_model_shift=True)
    torch.testing.assert_close(kept, schedules.grid_sigmas("trailing", user, 4), rtol=0, atol=0)
    assert not torch.allclose(kept, P.preset_sigmas(p, user, base="qwen_image"))
    f = P.get_preset("Hyper-FLUX 8-step")
    for mu in (0.5, 1.15):
        ms = flow.FluxSchedule(mu)
        assert P.preset_shift(f, ms) is ms
        torch.testing.assert_close(P.preset_sigmas(f, ms, base="flux"), schedules.grid_sigmas("trailing", ms, 8))


def test_wrong_kind_and_family_errors_name_both():
    with pytest.raises(ValueError, match=r"preset 'LCM-LoRA' is for SD-family .* but this model is SD3 \('sd3'\), a "
                                         r"flow-matching model"):
        P.preset_sigmas(P.get_preset("LCM-LoRA"), flow.FlowSchedule(3.0), base="sd3")
    with pytest.raises(ValueError, match=r"is for Wan 2.1 / Wan 2.2 A14B \('wan'\) models, but this model is a "
                                         r"discrete VP"):
        P.preset_sigmas(P.get_preset("Wan 2.2 Lightning 4-step"), DiscreteSchedule())
    with pytest.raises(ValueError, match=r"'SD-Turbo' is for SD2.x \('sd2'\) models, but this model is SDXL"):
        P.check_base(P.get_preset("SD-Turbo"), "sdxl")
    P.check_base(P.get_preset("Hyper-SD 4-step"), "sdxl")  # the SD presets fit any SD family
    P.check_base(P.get_preset("Hyper-SD 4-step"), "unknown", DiscreteSchedule())
    with pytest.raises(ValueError, match="flow-matching models: its grid is placed in sigmas"):
        P.preset_timesteps(P.get_preset("Hyper-SD3 4-step"), 4)


def test_preset_boundary():
    p = P.get_preset("Wan 2.2 Lightning 4-step")
    assert P.preset_boundary(p) == 2 and P.preset_boundary(p, 4) == 2
    assert [P.preset_boundary(p, n) for n in (2, 3, 6, 8)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="needs at least 2 steps"):
        P.preset_boundary(p, 1)
    assert all(P.preset_boundary(q) is None for q in P.PRESETS if q.name != p.name)
