"""The one few-step step on flow-matching (CONST) models, host-free: coefficients, TCD, split runs, video batches,
the fused loop, the unserved model samplings."""
from __future__ import annotations

import math
import types

import pytest
import torch

from fewstep.kernels import triton_available
from fewstep.samplers import flow
from fewstep.samplers.lcm import sample_lcm
from fewstep.samplers.noise import initial_noise
from fewstep.samplers.parametrisation import Flow, is_flow, parametrisation, resolve_model_sampling
from fewstep.samplers.pcm import sample_pcm
from fewstep.samplers.step import Step, step_coefficients
from fewstep.samplers.tcd import sample_tcd

SHIFTS = [1.0, 3.0, 5.0, 8.0, 17.0]


def sigmas_of(shift, steps, grid="trailing", dtype=torch.float64):
    ms = flow.FlowSchedule(shift, dtype=torch.float64)
    return ms, flow.fractions_to_sigmas(flow.grid_fractions(grid, steps, ms), ms, dtype=dtype)


def toy(x, sigma, **_):
    """A smooth x0 'network' (k-diffusion denoiser on the CONST sample)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return 0.7 * torch.tanh(x) * (1 - s) + 0.2 * torch.sin(3 * s + x)


def textbook_tcd(x, sigmas, gamma, noises):
    """The issue's formulas, float64: eps_hat, the move to sigma_s = (1 - gamma) sigma_next, the re-noise."""
    for i in range(len(sigmas) - 1):
        sig, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = toy(x, sigmas[i:i + 1])
        eps = (x - (1 - sig) * d) / sig
        ss = (1 - gamma) * sn
        x_s = (1 - ss) * d + ss * eps
        x = (1 - sn) / (1 - ss) * x_s
        if sn > 0:
            x = x + math.sqrt(sn * sn - (ss * (1 - sn) / (1 - ss)) ** 2) * noises[i]
    return x


def test_flow_twins_are_recognised_and_parametrised():
    for ms in (flow.FlowSchedule(3.0), flow.FlowSchedule(3.0, multiplier=1), flow.FluxSchedule(1.15)):
        assert is_flow(ms) and resolve_model_sampling(None, ms) is ms
        assert isinstance(parametrisation(ms), Flow)
    assert flow.timestep_scale(flow.FlowSchedule(3.0)) == 1000.0 and flow.timestep_scale(flow.FluxSchedule()) == 1.0


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_tcd_target_stays_below_the_next_sigma_with_a_real_renoise(shift, gamma):
    """sigma_s = (1 - gamma) sigma_next in the model's own timestep (k*sigma): never above sigma_next, so the re-noise
    variance is never negative; composing the host's sigma(timestep(.)) would break this at shift != 1."""
    ms, sigmas = sigmas_of(shift, 8, "flowmatch")
    c = step_coefficients(sigmas, parametrisation(ms), Step(gamma))
    sn = c.sigma_next
    assert torch.allclose(c.sigma_s, (1 - gamma) * sn, rtol=0, atol=0)
    assert torch.allclose(c.s, (1 - gamma) * c.t_next, rtol=1e-15, atol=0) and torch.equal(c.t, sigmas[:-1] * 1000)
    var = sn**2 - (c.sigma_s * (1 - sn) / (1 - c.sigma_s)) ** 2
    want = torch.where(c.sigma_s == sn, 0.0, var.clamp(min=0).sqrt())  # Euler (gamma 0): exactly no noise
    assert bool((var >= -1e-15).all()) and torch.allclose(c.a_z, want, rtol=1e-12, atol=0)
    composed = ms.sigma(ms.timestep(sn[:-1]) * (1 - gamma))  # the pitfall: shift applied to an unshifted timestep
    if shift > 1 and 0 < gamma <= 0.5:
        assert bool((composed > sn[:-1]).any())  # lands above sigma_next: a negative variance


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_coefficients_of_the_named_steps(shift):
    ms, sigmas = sigmas_of(shift, 4)
    p = parametrisation(ms)
    euler = step_coefficients(sigmas, p, Step(0.0))
    lcm = step_coefficients(sigmas, p, Step(1.0, True, True))
    s, sn = sigmas[:-1], sigmas[1:]
    # Euler / DDIM: x + (x - D)/sigma (sigma_next - sigma) = (sn/s) x + (1 - sn/s) D, no noise
    assert torch.allclose(euler.a_x, sn / s, rtol=1e-15) and torch.allclose(euler.a_d, 1 - sn / s, rtol=1e-15)
    assert torch.equal(euler.a_z, torch.zeros(4, dtype=torch.float64))
    # LCM: (1 - sn) D + sn z, no boundary condition on flow models (c_skip 0, c_out 1)
    assert torch.equal(lcm.a_x, torch.zeros(4, dtype=torch.float64)) and torch.equal(lcm.a_d, 1 - sn)
    assert torch.equal(lcm.a_z, sn) and torch.equal(lcm.b_x, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(lcm.b_d, torch.ones(4, dtype=torch.float64))
    for g, ref in ((0.0, euler), (1.0, lcm)):  # TCD's endpoints are these steps, bit for bit
        tcd = step_coefficients(sigmas, p, Step(g))
        for f in ("a_x", "a_d", "a_z", "b_x", "b_d"):
            assert torch.equal(getattr(tcd, f), getattr(ref, f)), (g, f)
    diff = step_coefficients(sigmas, p, Step(0.3), final_step="diffusers")  # a step to 0 lands on D either way
    assert float(diff.a_x[-1]) == 0.0 and float(diff.a_d[-1]) == 1.0


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_tcd_run_equals_the_textbook_formulas(gamma, shift):
    ms, sigmas = sigmas_of(shift, 5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    noises = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(5)]
    queue = list(noises)
    got = sample_tcd(toy, x, sigmas, gamma=gamma, noise_sampler=lambda *_: queue.pop(0), model_sampling=ms,
                     disable=True)
    torch.testing.assert_close(got, textbook_tcd(x, sigmas, gamma, noises), rtol=0, atol=1e-12)


def test_sigmas_above_1_and_unserved_samplings_are_refused():
    ms, sigmas = sigmas_of(3.0, 4)
    with pytest.raises(ValueError, match=r"sigmas on a flow-matching \(CONST\) model lie in \[0, 1\]"):
        sample_lcm(toy, torch.zeros(1, 4), sigmas * 2, model_sampling=ms, disable=True)

    class CONST:
        pass

    class ModelSamplingLogFlow(CONST):  # a CONST sampling whose timestep is not k*sigma
        sigmas = torch.linspace(0.001, 1, 1000)

        def timestep(self, sigma):
            return torch.log1p(sigma)

        def sigma(self, t):
            return torch.expm1(t)

    with pytest.raises(ValueError, match=r"serve .* flow-matching .*samples as ModelSamplingLogFlow .*not "
                                         r"proportional to sigma"):
        parametrisation(ModelSamplingLogFlow())
    edm = type("ModelSamplingContinuousEDM", (), {"sigma": abs, "timestep": abs, "sigmas": torch.ones(3)})
    with pytest.raises(ValueError, match="samples as ModelSamplingContinuousEDM"):
        parametrisation(edm())
    with pytest.raises(ValueError, match="samples as SimpleNamespace"):
        parametrisation(types.SimpleNamespace(sigma=abs, timestep=abs))


class ConstHost:
    """What the host's KSAMPLER does around a sampler on a CONST model: noise_scaling before the loop,
    inverse_noise_scaling(sigma_last) after it; KSamplerAdvanced's second stage adds no noise."""

    @staticmethod
    def sample(sampler, latent, noise, sigmas, ms, noises, **kw):
        x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent
        out = sampler(toy, x, sigmas, noise_sampler=lambda s, sn: noises[round(float(s) * 1e9)], model_sampling=ms,
                      disable=True, **kw)
        return out / (1.0 - sigmas[-1])


@pytest.mark.parametrize("split_at", [1, 2, 3])
@pytest.mark.parametrize("sampler, kw", [(sample_pcm, {}), (sample_lcm, {}), (sample_tcd, {"gamma": 0.4})],
                         ids=["euler", "lcm", "tcd"])
def test_split_run_equals_the_unsplit_run(sampler, kw, split_at):
    """Stage 1 stops at sigma_end > 0 and hands back x / (1 - sigma_end) (return with leftover noise); stage 2 scales it
    back with (1 - sigma_start) and continues: the same trajectory as one run (step noise keyed by sigma, as a
    replayed noise source; with fewstep's default noise the second stage draws fresh step noise)."""
    ms, sigmas = sigmas_of(5.0, 4)
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(latent.shape, generator=g, dtype=torch.float64)
    noises = {round(float(s) * 1e9): torch.randn(latent.shape, generator=g, dtype=torch.float64) for s in sigmas}
    whole = ConstHost.sample(sampler, latent, noise, sigmas, ms, noises, **kw)
    first = ConstHost.sample(sampler, latent, noise, sigmas[:split_at + 1], ms, noises, **kw)
    second = ConstHost.sample(sampler, first, torch.zeros_like(noise), sigmas[split_at:], ms, noises, **kw)
    torch.testing.assert_close(second, whole, rtol=0, atol=1e-12)
    assert not torch.allclose(first, whole)


@pytest.mark.parametrize("sampler, kw", [(sample_lcm, {}), (sample_tcd, {"gamma": 0.6})], ids=["lcm", "tcd"])
def test_video_latents_batch_index_noise_independence(sampler, kw):
    """5-D video latents [B, C, T, H, W]: image k's initial and step noise depend on (seed, k) only, so video k of a
    batch equals the same video sampled alone with batch_offset k; different videos differ."""
    ms, sigmas = sigmas_of(5.0, 4, dtype=torch.float32)
    shape = (3, 4, 3, 4, 4)
    x = initial_noise(shape, 9)
    batch = sampler(toy, x.clone(), sigmas, {"seed": 9}, model_sampling=ms, disable=True, **kw)
    for k in range(3):
        alone = sampler(toy, initial_noise((1, *shape[1:]), 9, [k]), sigmas, {"seed": 9}, model_sampling=ms,
                        disable=True, batch_offset=k, **kw)
        assert torch.equal(alone[0], batch[k]), k
    assert not torch.allclose(batch[0], batch[1])
    pair = sampler(toy, x[:2].clone(), sigmas, {"seed": 9}, model_sampling=ms, disable=True, **kw)
    assert torch.equal(pair, batch[:2])


@pytest.mark.skipif(not triton_available(), reason="triton is not importable")
@pytest.mark.parametrize("split", [False, True], ids=["to-sigma-0", "split-sigmas"])
@pytest.mark.parametrize("sampler, kw", [(sample_lcm, {}), (sample_tcd, {"gamma": 0.3}), (sample_pcm, {})],
                         ids=["lcm", "tcd", "euler"])
def test_fused_loop_equals_unfused_on_flow(sampler, kw, split, monkeypatch):
    """The flow coefficients run through the fused Triton step (interpreter on the CPU) bit for bit as the unfused
    loop: the kernel needs no change for flow models."""
    from fewstep.kernels import loop as kernel_loop
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FEWSTEP_ALLOW_TRITON_INTERPRETER", "1")
    monkeypatch.setattr(kernel_loop, "use_fused", lambda mode, x: mode == "on")
    used, real = [], kernel_loop.sample_fused
    monkeypatch.setattr(kernel_loop, "sample_fused", lambda *a, **k: used.append(1) or real(*a, **k))
    ms, sigmas = sigmas_of(3.0, 4, dtype=torch.float32)
    if split:
        sigmas = sigmas[:-1]
    x = initial_noise((2, 4, 2, 4, 4), 4)
    off = sampler(toy, x, sigmas, {"seed": 4}, model_sampling=ms, disable=True, fused="off", **kw)
    on = sampler(toy, x, sigmas, {"seed": 4}, model_sampling=ms, disable=True, fused="on", **kw)
    assert used == [1] and torch.equal(on, off)
