"""Flow matching: trajectories equal diffusers' FlowMatchLCMScheduler / FlowMatchEulerDiscreteScheduler to 1e-6.

Float64 on both sides: diffusers' flow schedulers upcast to float32 internally (``sample.to(torch.float32)``, float32
sigma tables), so for the reference run their modules see a ``torch`` whose ``float32`` is float64 -- the same code
path, in double precision. Step noise is replayed from one list. The model is an analytic velocity field in diffusers'
convention ``v(x, t)`` with ``t = sigma * 1000`` (the scheduler's ``timesteps``); our side wraps it into the
k-diffusion denoiser ``D(x, sigma) = x - sigma * v(x, 1000 sigma)`` on a float64 twin of ComfyUI's
``ModelSamplingDiscreteFlow`` (or ``ModelSamplingFlux`` for the resolution-shifted Flux pipelines).
Schedules: the FlowMatch default grid (SD3 pipelines: ``flowmatch``), and the ``trailing`` grid ``linspace(1, 1/N,
N)`` that the Flux / Qwen-Image pipelines pass, with the exponential (``mu``) shift; img2img strength by the
SD3/Flux pipelines' ``get_timesteps``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.samplers import flow, schedules
from fewstep.samplers.lcm import sample_lcm
from fewstep.samplers.pcm import sample_pcm
from fewstep.samplers.tcd import sample_tcd

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_flow_match_euler_discrete as d_euler  # noqa: E402
import diffusers.schedulers.scheduling_flow_match_lcm as d_lcm  # noqa: E402

SHAPES = {"image": (2, 4, 6, 6), "video": (1, 4, 3, 4, 4)}
STRENGTHS = [1.0, 0.75, 0.5, 0.3]
SHIFTS = [1.0, 3.0, 5.0]


class _Float64Torch:
    """``torch`` as a diffusers scheduler module sees it in this test: float32 means float64."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture(autouse=True)
def _double_precision_reference(monkeypatch):
    for module in (d_euler, d_lcm):
        monkeypatch.setattr(module, "torch", _Float64Torch())


def velocity(x, t):
    """Smooth deterministic 'network' in diffusers' convention; ``t`` is the timestep sigma*1000."""
    return 0.6 * torch.tanh(x) + 0.3 * torch.cos(t / 170.0 + x) - 0.2 * x * (t / 1000.0)


def denoiser(x, sigma, **_):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64)
    return x - s * velocity(x, s * 1000.0)


def _inputs(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    steps_noise = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    return image, noise, steps_noise


def _run_diffusers(sch, begin, x, noises, monkeypatch):
    queue = list(noises)
    monkeypatch.setattr(d_lcm, "randn_tensor", lambda *a, **k: queue.pop(0))
    sch.set_begin_index(begin)
    traj, sample = [], x.clone()
    for t in sch.timesteps[begin:]:
        traj.append(sample)
        sample = sch.step(velocity(sample, t), t, sample, return_dict=False)[0]
    return traj, sample, len(noises) - len(queue)


def _run_ours(sampler, x, sigmas, ms, noises, **kw):
    queue, traj = list(noises), []
    out = sampler(denoiser, x, sigmas, callback=lambda d: traj.append(d["x"]), disable=True,
                  noise_sampler=lambda s, sn: queue.pop(0), model_sampling=ms, **kw)
    return traj, out, len(noises) - len(queue)


def _assert_same(ours, theirs, kind):
    """Same trajectory and output; the same noise draws, except that diffusers' FlowMatchLCMScheduler also draws on
    its last step (and multiplies that draw by sigma_next = 0), which fewstep skips."""
    (traj_o, out_o, used_o), (traj_d, out_d, used_d) = ours, theirs
    assert used_d == used_o + (1 if kind == "lcm" else 0) and len(traj_o) == len(traj_d)
    for a, b in zip(traj_o, traj_d):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_o, out_d, rtol=0, atol=1e-6)
    assert out_o.dtype == torch.float64


def _case(cls, shift, steps, strength, grid="flowmatch"):
    """(diffusers scheduler set for the run, its begin index by the img2img rule, our model sampling)."""
    if grid == "flowmatch":
        sch = cls(shift=shift)
        sch.set_timesteps(steps)
        ms = flow.FlowSchedule(shift, dtype=torch.float64)
    else:  # Flux / Qwen-Image pipelines: trailing sigmas, exponential shift mu = log(shift)
        mu = math.log(shift)
        sch = cls(use_dynamic_shifting=True, time_shift_type="exponential")
        sch.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
        ms = flow.FluxSchedule(mu, dtype=torch.float64)
    n = len(sch.timesteps)
    begin = n - flow.strength_keep(n, strength)
    if strength == 1.0:
        assert begin == 0
    return sch, begin, ms


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", range(1, 9))
@pytest.mark.parametrize("kind", ["lcm", "euler"])
def test_matches_diffusers_flowmatch(kind, steps, strength, shift, shape, monkeypatch):
    cls = d_lcm.FlowMatchLCMScheduler if kind == "lcm" else d_euler.FlowMatchEulerDiscreteScheduler
    sch, begin, ms = _case(cls, shift, steps, strength)
    sigmas = _sigmas64("flowmatch", ms, steps, strength)
    torch.testing.assert_close(sigmas, sch.sigmas[begin:], rtol=0, atol=1e-12)
    image, noise, noises = _inputs(SHAPES[shape], steps, 100 * steps + int(10 * shift))
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * image  # diffusers' scale_noise, at the first kept sigma
    theirs = _run_diffusers(sch, begin, x, noises, monkeypatch)
    ours = _run_ours(sample_lcm if kind == "lcm" else sample_pcm, x, sigmas, ms, noises)
    _assert_same(ours, theirs, kind)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["lcm", "euler"])
def test_matches_diffusers_on_the_flux_pipeline_grid(kind, steps, strength, shift, monkeypatch):
    """Trailing sigmas linspace(1, 1/N, N) with the exponential shift: FluxPipeline / QwenImagePipeline's recipe,
    ComfyUI's ModelSamplingFlux (mu) -- and with mu = log(3) Qwen-Image-Lightning's (= ModelSamplingAuraFlow 3)."""
    cls = d_lcm.FlowMatchLCMScheduler if kind == "lcm" else d_euler.FlowMatchEulerDiscreteScheduler
    sch, begin, ms = _case(cls, shift, steps, strength, grid="trailing")
    sigmas = _sigmas64("trailing", ms, steps, strength)
    torch.testing.assert_close(sigmas, sch.sigmas[begin:], rtol=0, atol=1e-7)  # diffusers rounds u to float32
    if shift == 3.0:  # Flux's exponential shift at mu = log 3 is the SD3/AuraFlow shift 3
        aura = _sigmas64("trailing", flow.FlowSchedule(3.0, multiplier=1, dtype=torch.float64), steps, strength)
        torch.testing.assert_close(sigmas, aura, rtol=0, atol=1e-12)
    image, noise, noises = _inputs(SHAPES["image"], steps, 7 * steps)
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * image
    theirs = _run_diffusers(sch, begin, x, noises, monkeypatch)
    ours = _run_ours(sample_lcm if kind == "lcm" else sample_pcm, x, sigmas, ms, noises)
    _assert_same(ours, theirs, kind)


def test_stochastic_flowmatch_euler_is_the_lcm_step(monkeypatch):
    """FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) -- and PCM's stochastic flow scheduler, the same
    step -- is fewstep's LCM step."""
    sch = d_euler.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sch.set_timesteps(4)
    ms = flow.FlowSchedule(3.0, dtype=torch.float64)
    sigmas = _sigmas64("flowmatch", ms, 4, 1.0)
    _, noise, noises = _inputs(SHAPES["image"], 4, 3)
    queue = list(noises)
    monkeypatch.setattr(d_euler, "randn_tensor", lambda *a, **k: queue.pop(0))
    sample = noise.clone()
    for t in sch.timesteps:
        sample = sch.step(velocity(sample, t), t, sample, return_dict=False)[0]
    ours = _run_ours(sample_lcm, noise.clone(), sigmas, ms, noises)[1]
    torch.testing.assert_close(ours, sample, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3, 4, 8])
def test_tcd_gamma_0_and_1_are_euler_and_lcm_exactly(steps):
    """TCD's endpoints on a flow model are the diffusers-exact Euler and LCM runs, bit for bit (same coefficients)."""
    ms = flow.FlowSchedule(3.0, dtype=torch.float64)
    sigmas = _sigmas64("flowmatch", ms, steps, 1.0)
    _, noise, noises = _inputs(SHAPES["video"], steps, 11)
    euler = _run_ours(sample_pcm, noise, sigmas, ms, noises)
    lcm = _run_ours(sample_lcm, noise, sigmas, ms, noises)
    tcd0 = _run_ours(sample_tcd, noise, sigmas, ms, noises, gamma=0.0)
    tcd1 = _run_ours(sample_tcd, noise, sigmas, ms, noises, gamma=1.0)
    assert torch.equal(tcd0[1], euler[1]) and tcd0[2] == euler[2] == 0
    assert torch.equal(tcd1[1], lcm[1]) and tcd1[2] == lcm[2] == steps - 1
    assert steps == 1 or not torch.allclose(euler[1], lcm[1])


def _sigmas64(grid, ms, steps, strength):
    """Our grid in float64 (the nodes hand the host float32, as its schedulers do)."""
    if grid == "flowmatch":
        u = flow.grid_fractions("flowmatch", steps, ms)
    else:
        u = flow.grid_fractions("trailing", steps)
    sig = flow.fractions_to_sigmas(u, ms, dtype=torch.float64)
    keep = flow.strength_keep(len(sig) - 1, strength)
    out = sig[len(sig) - 1 - keep:]
    assert torch.allclose(out.float(), schedules.grid_sigmas(grid, ms, steps, strength), rtol=0, atol=1e-7)
    return out
