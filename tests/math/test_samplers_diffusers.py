"""Trajectories equal diffusers LCMScheduler / TCDScheduler to 1e-6 in float64 with replayed noise.

Both sides use the same float64 abar table (diffusers' ``alphas_cumprod`` is overridden with 1/(1+sigma^2) of
our ``DiscreteSchedule``) and the same analytic model written in diffusers' convention (eps, v or sample as a
function of the VP sample and the timestep). Our side wraps it into a k-diffusion VE denoiser.
"""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.samplers.discrete import DiscreteSchedule
from fewstep.samplers.lcm import sample_lcm
from fewstep.samplers.schedules import lcm_timesteps, tcd_timesteps, timesteps_to_sigmas
from fewstep.samplers.tcd import sample_tcd

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_lcm as d_lcm  # noqa: E402
import diffusers.schedulers.scheduling_tcd as d_tcd  # noqa: E402

SCHED = DiscreteSchedule(dtype=torch.float64)
ABAR = 1.0 / (1.0 + SCHED.sigmas**2)
SHAPE = (2, 4, 6, 6)
STRENGTHS = [1.0, 0.75, 0.5, 0.3, 0.1]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def model_output(pred, x_vp, t):
    """Smooth deterministic 'network' in diffusers' convention; ``t`` is a float64 tensor broadcastable to x."""
    if pred == "epsilon":
        return 0.5 * torch.tanh(x_vp) + 0.1 * torch.sin(t / 100.0 + x_vp)
    if pred == "v_prediction":
        return 0.3 * torch.tanh(x_vp) + 0.2 * torch.cos(t / 150.0)
    return torch.tanh(x_vp) * (0.5 + t / 2000.0)


class VEDenoiser:
    """k-diffusion denoiser ``D(x, sigma)`` built from the diffusers-convention model."""

    def __init__(self, pred):
        self.pred = pred

    def __call__(self, x, sigma, **_):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64)
        t = SCHED.timestep(sigma).to(torch.float64).reshape(s.shape)
        x_vp = x / (1.0 + s * s).sqrt()
        abar = 1.0 / (1.0 + s * s)
        out = model_output(self.pred, x_vp, t)
        if self.pred == "epsilon":
            return x - s * out
        if self.pred == "v_prediction":
            return abar.sqrt() * x_vp - (1.0 - abar).sqrt() * out
        return out


def _scheduler(cls, pred):
    sch = cls(prediction_type=pred)
    sch.alphas_cumprod = ABAR.clone()
    return sch


def _run_diffusers(sch, pred, x_vp, noises, monkeypatch, module, **step_kwargs):
    queue = list(noises)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue.pop(0))
    traj, sample = [], x_vp.clone()
    for t in sch.timesteps.tolist():
        traj.append(sample)
        out = model_output(pred, sample, torch.tensor(float(t), dtype=torch.float64))
        sample = sch.step(out, t, sample, return_dict=False, **step_kwargs)[0]
    return traj, sample, len(noises) - len(queue)


def _run_ours(sampler, pred, x_vp, timesteps, noises, **kwargs):
    sigmas = timesteps_to_sigmas(timesteps, SCHED)
    queue = list(noises)
    traj = []

    def callback(d):
        traj.append(d["x"] / math.sqrt(1.0 + float(d["sigma"]) ** 2))

    x = x_vp * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    out = sampler(VEDenoiser(pred), x, sigmas, callback=callback, disable=True, noise_sampler=lambda s, sn: queue.pop(0),
                  model_sampling=SCHED, **kwargs)
    return traj, out, len(noises) - len(queue)


def _inputs(steps):
    g = torch.Generator().manual_seed(1234 + steps)
    x_vp = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(steps)]
    return x_vp, noises


def _assert_same(ours, theirs):
    (traj_o, out_o, used_o), (traj_d, out_d, used_d) = ours, theirs
    assert used_o == used_d
    assert len(traj_o) == len(traj_d)
    for a, b in zip(traj_o, traj_d):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_o, out_d, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", range(1, 9))
def test_lcm_matches_diffusers(steps, strength, pred, monkeypatch):
    sch = _scheduler(diffusers.LCMScheduler, pred)
    try:
        sch.set_timesteps(steps, strength=strength)
    except ValueError:
        with pytest.raises(ValueError, match="steps"):
            lcm_timesteps(steps, strength=strength)
        return
    timesteps = lcm_timesteps(steps, strength=strength)
    assert timesteps == sch.timesteps.tolist()
    x_vp, noises = _inputs(steps)
    theirs = _run_diffusers(sch, pred, x_vp, noises, monkeypatch, d_lcm)
    ours = _run_ours(sample_lcm, pred, x_vp, timesteps, noises)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", range(1, 9))
def test_tcd_matches_diffusers(steps, strength, gamma, pred, monkeypatch):
    sch = _scheduler(diffusers.TCDScheduler, pred)
    try:
        sch.set_timesteps(steps, strength=strength)
    except ValueError:
        with pytest.raises(ValueError, match="steps"):
            tcd_timesteps(steps, strength=strength)
        return
    timesteps = tcd_timesteps(steps, strength=strength)
    assert timesteps == sch.timesteps.tolist()
    x_vp, noises = _inputs(steps)
    theirs = _run_diffusers(sch, pred, x_vp, noises, monkeypatch, d_tcd, eta=gamma)
    ours = _run_ours(sample_tcd, pred, x_vp, timesteps, noises, gamma=gamma, final_step="diffusers")
    _assert_same(ours, theirs)
