"""Closed-form checks under the flow-matching parametrisation, with Gaussian data.

Data x0 ~ N(mu, s^2) per element and x = (1 - sigma) x0 + sigma eps, so x ~ N((1 - sigma) mu, v_sigma) with
v_sigma = (1 - sigma)^2 s^2 + sigma^2. Two denoisers, both affine in x (D = alpha x + beta):

* the posterior mean E[x0 | x] = mu + (1 - sigma) s^2 / v_sigma (x - (1 - sigma) mu);
* the exact consistency function (the probability-flow ODE's endpoint map, for Gaussian data a rescaling of the
  standardised x): f(x, sigma) = mu + s (x - (1 - sigma) mu) / sqrt(v_sigma).

The step, written here from its definition (not from ``step_coefficients``): eps_hat = (x - (1 - sigma) D) / sigma,
x_s = (1 - sigma_s) D + sigma_s eps_hat with sigma_s = (1 - gamma) sigma_next, then x_next = (1 - sigma_next) /
(1 - sigma_s) x_s + c z with c^2 = sigma_next^2 - (sigma_s (1 - sigma_next) / (1 - sigma_s))^2; a step to 0 returns D.
Every step is affine in x plus independent noise, so the output's mean and variance follow exactly; the samplers'
sampled statistics (200k elements) must match that recursion within 5 standard errors at 1, 2, 4, 8 steps, gamma in
{0, 0.3, 1}, shifts 1 and 3 -- and deliberately wrong noise coefficients must fail it. With the consistency function,
LCM (gamma 1) returns the data's mean and variance at every step count; gamma < 1 does not.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fewstep.samplers import consistency, flow
from fewstep.samplers.lcm import sample_lcm
from fewstep.samplers.noise import initial_noise
from fewstep.samplers.pcm import sample_pcm
from fewstep.samplers.tcd import sample_tcd

MU, S = 0.5, 0.8
SHAPE = (4, 50_000)
SAMPLERS = {1.0: lambda *a, **k: sample_lcm(*a, **k), 0.0: lambda *a, **k: sample_pcm(*a, **k),
            0.3: lambda *a, **k: sample_tcd(*a, gamma=0.3, **k)}


def _v(sigma):
    return (1 - sigma) ** 2 * S * S + sigma * sigma


def affine(kind, sigma):
    """(alpha, beta) of the denoiser ``kind`` ("posterior" or "consistency") at noise level sigma."""
    alpha = (1 - sigma) * S * S / _v(sigma) if kind == "posterior" else S / math.sqrt(_v(sigma))
    return alpha, MU - alpha * (1 - sigma) * MU


def denoiser(kind):
    def d(x, sigma, **_):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64)
        v = (1 - sig) ** 2 * S * S + sig * sig
        alpha = (1 - sig) * S * S / v if kind == "posterior" else S / v.sqrt()
        return MU + alpha * (x - (1 - sig) * MU)
    return d


def closed_form(sigmas, gamma, kind):
    """Mean and variance of the output, starting from x = sigma_0 * N(0, 1) (sigma_0 = 1: pure noise)."""
    m, v = 0.0, float(sigmas[0]) ** 2
    for i in range(len(sigmas) - 1):
        sig, sn = float(sigmas[i]), float(sigmas[i + 1])
        alpha, beta = affine(kind, sig)
        if sn == 0:
            return alpha * m + beta, alpha * alpha * v
        ss = (1 - gamma) * sn
        # x_s = (1 - ss) D + ss (x - (1 - sig) D) / sig, D = alpha x + beta
        ax, ad = ss / sig, (1 - ss) - ss * (1 - sig) / sig
        a, b = (ax + ad * alpha), ad * beta
        scale = (1 - sn) / (1 - ss)
        c2 = sn * sn - (ss * scale) ** 2
        assert c2 >= -1e-15, (sig, sn, ss)
        m, v = scale * (a * m + b), scale * scale * a * a * v + max(c2, 0.0)
    raise AssertionError("sigmas must end in 0")


def run(gamma, steps, shift, kind="posterior", seed=0):
    ms = flow.FlowSchedule(shift, dtype=torch.float64)
    sigmas = flow.fractions_to_sigmas(flow.grid_fractions("trailing", steps), ms, dtype=torch.float64)
    x = initial_noise(SHAPE, seed, dtype=torch.float64) * sigmas[0]
    out = SAMPLERS[gamma](denoiser(kind), x, sigmas, {"seed": seed + 1}, disable=True, model_sampling=ms)
    return sigmas, out


def deviation(m, v, out):
    n = out.numel()
    return max(abs(out.mean().item() - m) / math.sqrt(v / n), abs(out.var().item() - v) / (v * math.sqrt(2 / n)))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_moments_match_the_exact_recursion(steps, gamma, shift):
    sigmas, out = run(gamma, steps, shift)
    m, v = closed_form(sigmas, gamma, "posterior")
    if steps == 1:  # one step from pure noise (sigma 1) returns E[x0 | eps]: the data mean, zero variance
        assert (m, v) == pytest.approx((MU, 0.0), abs=1e-12)
        torch.testing.assert_close(out, torch.full_like(out, MU), rtol=0, atol=1e-12)
        return
    assert deviation(m, v, out) < 5.0, (m, v, out.mean().item(), out.var().item())
    assert v < S * S  # a few steps of the posterior mean are narrower than the data


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_with_the_consistency_function_reproduces_the_data(steps, shift):
    sigmas, out = run(1.0, steps, shift, kind="consistency", seed=steps)
    m, v = closed_form(sigmas, 1.0, "consistency")
    assert (m, v) == pytest.approx((MU, S * S), rel=1e-12)
    assert deviation(MU, S * S, out) < 5.0, (out.mean().item(), out.var().item())


@pytest.mark.parametrize("gamma", [0.0, 0.3])
@pytest.mark.parametrize("steps", [2, 4])
def test_gamma_below_1_with_the_consistency_function_does_not(steps, gamma):
    sigmas, out = run(gamma, steps, 3.0, kind="consistency")
    m, v = closed_form(sigmas, gamma, "consistency")
    assert deviation(m, v, out) < 5.0
    assert abs(v - S * S) > 0.01 * S * S, (gamma, steps, v)


# LCM's sigma_s = 0, so sigma_next IS its noise coefficient; only a missing one is wrong there.
@pytest.mark.parametrize("gamma, steps, wrong", [
    (1.0, 2, "missing"), (1.0, 4, "missing"), (0.3, 2, "missing"), (0.3, 4, "missing"),
    (0.3, 2, "sigma_next"), (0.3, 4, "sigma_next"),
])
def test_wrong_noise_coefficient_is_detected(gamma, steps, wrong, monkeypatch):
    real = consistency.step_coefficients

    def perturbed(*args, **kwargs):
        c = real(*args, **kwargs)
        bad = torch.where(c.a_z > 0, c.sigma_next, c.a_z) if wrong == "sigma_next" else torch.zeros_like(c.a_z)
        return dataclasses.replace(c, a_z=bad)

    monkeypatch.setattr(consistency, "step_coefficients", perturbed)
    sigmas, out = run(gamma, steps, 3.0)
    assert deviation(*closed_form(sigmas, gamma, "posterior"), out) > 20.0
