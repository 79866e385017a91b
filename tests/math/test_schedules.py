"""Timestep grids: reference-doc numbers, diffusers parity, and loud errors on impossible requests."""
from __future__ import annotations

import pytest
import torch

from fewstep.samplers.discrete import DiscreteSchedule
from fewstep.samplers.schedules import (
    fixed_timesteps,
    lcm_timesteps,
    pcm_phase_timesteps,
    tcd_timesteps,
    timesteps_to_sigmas,
    trailing_timesteps,
)

diffusers = pytest.importorskip("diffusers")


def test_lcm_grid_reference_numbers():
    assert lcm_timesteps(1) == [999]
    assert lcm_timesteps(2) == [999, 499]
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert tcd_timesteps(4) == [999, 759, 499, 259]


@pytest.mark.parametrize(
    "steps, strength, expected",
    [
        (4, 0.5, [499, 379, 259, 139]),
        (4, 0.3, [299, 239, 159, 79]),
        (4, 0.7, [699, 539, 359, 179]),
        (4, 0.75, [739, 559, 379, 199]),
        (6, 0.6, [599, 499, 399, 299, 199, 99]),
        (2, 0.05, [39, 19]),
    ],
)
def test_lcm_img2img_strength_table(steps, strength, expected):
    assert lcm_timesteps(steps, strength=strength) == expected


def test_pcm_phase_edges():
    assert pcm_phase_timesteps(1) == [999]
    assert pcm_phase_timesteps(2) == [999, 499]
    assert pcm_phase_timesteps(4) == [999, 739, 499, 239]
    assert pcm_phase_timesteps(8) == [999, 859, 739, 619, 499, 359, 239, 119]
    assert pcm_phase_timesteps(4, num_ddim_timesteps=40) == trailing_timesteps(4)


def test_trailing_reference_numbers():
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    assert trailing_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert tcd_timesteps(4, full_grid=True) == [999, 749, 499, 249]


@pytest.mark.parametrize("original_steps", [25, 50, 100])
@pytest.mark.parametrize("strength", [1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.3, 0.1, 0.05])
def test_lcm_and_tcd_grids_match_diffusers(original_steps, strength):
    lcm = diffusers.LCMScheduler(original_inference_steps=original_steps)
    tcd = diffusers.TCDScheduler()
    for steps in range(1, 21):
        try:
            lcm.set_timesteps(steps, strength=strength)
        except ValueError:
            with pytest.raises(ValueError, match=r"steps \(\d+\) exceeds the number of grid points"):
                lcm_timesteps(steps, original_steps, strength)
            continue
        assert lcm_timesteps(steps, original_steps, strength) == lcm.timesteps.tolist()
        tcd.set_timesteps(steps, original_inference_steps=original_steps, strength=strength)
        assert tcd_timesteps(steps, original_steps, strength, full_grid=True) == tcd.timesteps.tolist()
    if int(50 * strength) >= 4:
        tcd.set_timesteps(4, strength=strength)
        assert tcd_timesteps(4, strength=strength) == tcd.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 12, 25])
def test_trailing_matches_diffusers_ddim(steps):
    ddim = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    assert trailing_timesteps(steps) == ddim.timesteps.tolist()


def test_fixed_timesteps_parser():
    assert fixed_timesteps("800") == [800]
    assert fixed_timesteps(" 800, 400 ") == [800, 400]
    assert fixed_timesteps("999 499;0") == [999, 499, 0]
    for bad in ("", "abc", "400, 800", "800, 800", "1000", "-1", "8.5"):
        with pytest.raises(ValueError, match="timesteps"):
            fixed_timesteps(bad)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="steps"):
        lcm_timesteps(0)
    with pytest.raises(ValueError, match=r"steps \(51\) exceeds .* strength 1 \(50\)"):
        lcm_timesteps(51)
    with pytest.raises(ValueError, match=r"steps \(8\) exceeds .* strength 0.1 \(5\); lower steps or raise strength/denoise"):
        lcm_timesteps(8, strength=0.1)
    with pytest.raises(ValueError, match=r"\(0\)"):
        lcm_timesteps(1, strength=0.01)
    for bad in (0.0, -0.5, 1.5, True):
        with pytest.raises(ValueError, match="strength"):
            lcm_timesteps(4, strength=bad)
    with pytest.raises(ValueError, match="original_steps"):
        lcm_timesteps(4, original_steps=2000)
    with pytest.raises(ValueError, match="steps"):
        tcd_timesteps(60, original_steps=50, full_grid=True)
    with pytest.raises(ValueError, match="phases"):
        pcm_phase_timesteps(51)
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        pcm_phase_timesteps(4, num_ddim_timesteps=0)
    with pytest.raises(ValueError, match="steps"):
        trailing_timesteps(1001)


def test_discrete_schedule_reference_sigmas():
    ms = DiscreteSchedule()
    assert float(ms.sigma_max) == pytest.approx(14.6146, abs=1e-4)
    assert float(ms.sigma_min) == pytest.approx(0.0292, abs=1e-4)
    assert float(ms.sigma(torch.tensor(800.0))) == pytest.approx(5.111, abs=1e-3)
    assert float(ms.sigma(torch.tensor(19.0))) == pytest.approx(0.1345, abs=1e-4)
    ms64 = DiscreteSchedule(dtype=torch.float64)
    assert ms64.sigmas.dtype == torch.float64
    assert ms64.timestep(ms64.sigmas).tolist() == list(range(1000))
    mid = ms64.sigma(torch.tensor(500.5))
    assert float(ms64.sigmas[500]) < float(mid) < float(ms64.sigmas[501])
    # sqrt_linear == diffusers "linear"
    lin = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    ref = ((1 - lin.alphas_cumprod.double()) / lin.alphas_cumprod.double()).sqrt()
    torch.testing.assert_close(DiscreteSchedule("sqrt_linear", dtype=torch.float64).sigmas, ref, rtol=1e-4, atol=0)  # diffusers: float32
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule("cosine")


def test_timesteps_to_sigmas():
    ms = DiscreteSchedule(dtype=torch.float64)
    sig = timesteps_to_sigmas([999, 759, 499, 259], ms)
    assert sig.dtype == torch.float64 and sig.shape == (5,) and float(sig[-1]) == 0.0
    torch.testing.assert_close(sig[:-1], ms.sigmas[[999, 759, 499, 259]])
    assert timesteps_to_sigmas([800], DiscreteSchedule(), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="timesteps"):
        timesteps_to_sigmas([259, 499], ms)
    with pytest.raises(ValueError, match="timesteps"):
        timesteps_to_sigmas([], ms)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs numpy 2 copy keyword
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 12])
@pytest.mark.parametrize("strength", [0.2, 0.5, 0.74, 0.75, 1.0])
def test_strength_tail_is_diffusers_img2img_on_trailing_grids(steps, strength):
    """StableDiffusionImg2ImgPipeline.get_timesteps on Euler/DDIM 'trailing' keeps the last int(n*strength)."""
    from fewstep.samplers.schedules import strength_tail, trailing_timesteps
    sch = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", beta_schedule="scaled_linear",
                                           beta_start=0.00085, beta_end=0.012)
    sch.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    want = [int(t) for t in sch.timesteps[max(steps - init, 0):]]
    if not want:
        with pytest.raises(ValueError, match=r"keeps none of the \d+ steps"):
            strength_tail(trailing_timesteps(steps), strength)
        return
    assert strength_tail(trailing_timesteps(steps), strength) == want
