"""Closed-form check with Gaussian data and the perfect denoiser.

Data x0 ~ N(mu, s^2) per element; x_sigma = x0 + sigma*eps, so E[x0 | x] = mu + s^2/(s^2+sigma^2) (x - mu).
Every step is affine in x plus independent noise, so the mean m and variance v of x follow exactly:
D = alpha x + beta, x' = r x + (1-r) D + c z  =>  m' = A m + B, v' = A^2 v + c^2, with A = r + (1-r) alpha.
The recursion below is derived from the step definition alone (not from ``step_coefficients``) with the
correct re-noise coefficient c = sqrt(sigma_next^2 - sigma_s^2); the sampled statistics of ~200k elements must
match it within 5 standard errors, and deliberately wrong noise coefficients must fail that check.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fewstep.samplers import consistency
from fewstep.samplers.discrete import DiscreteSchedule
from fewstep.samplers.lcm import sample_lcm
from fewstep.samplers.noise import initial_noise
from fewstep.samplers.pcm import sample_pcm
from fewstep.samplers.schedules import lcm_timesteps, timesteps_to_sigmas
from fewstep.samplers.tcd import sample_tcd

SCHED = DiscreteSchedule(dtype=torch.float64)
MU, S = 0.5, 0.8
SHAPE = (4, 50_000)  # 200k elements
CASES = {  # name: (sampler, gamma, boundary, clean_intermediate)
    "lcm": (lambda *a, **k: sample_lcm(*a, **k), 1.0, True, True),
    "tcd": (lambda *a, **k: sample_tcd(*a, gamma=0.3, **k), 0.3, False, False),
    "ddim": (lambda *a, **k: sample_pcm(*a, **k), 0.0, False, False),
}


def perfect_denoiser(x, sigma, **_):
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S * S / (S * S + s2) * (x - MU)


def closed_form(sigmas, gamma, boundary, clean):
    """Mean and variance of the final x0 output, starting from x = sigma_max * N(0, 1)."""
    m, v = 0.0, float(sigmas[0]) ** 2
    for i in range(len(sigmas) - 1):
        sig, sn = float(sigmas[i]), float(sigmas[i + 1])
        k = S * S / (S * S + sig * sig)
        alpha, beta = k, (1 - k) * MU
        if boundary:
            t = float(SCHED.timestep(sigmas[i]))
            c_skip, c_out = 0.25 / ((10 * t) ** 2 + 0.25), 10 * t / math.sqrt((10 * t) ** 2 + 0.25)
            alpha, beta = c_out * alpha + c_skip / math.sqrt(1 + sig * sig), c_out * beta
        if sn == 0:  # final_step="x0": the output is D
            return alpha * m + beta, alpha * alpha * v
        t_next = float(SCHED.timestep(sigmas[i + 1]))
        s = math.floor((1 - gamma) * t_next)
        sigma_s = 0.0 if clean else (sn if s == t_next else float(SCHED.sigma(torch.tensor(float(s)))))
        r = sigma_s / sig
        a_tot, b_tot = r + (1 - r) * alpha, (1 - r) * beta
        m, v = a_tot * m + b_tot, a_tot * a_tot * v + (sn * sn - sigma_s * sigma_s)
    raise AssertionError("sigmas must end in 0")


def run(name, steps, seed=0):
    sampler = CASES[name][0]
    sigmas = timesteps_to_sigmas(lcm_timesteps(steps), SCHED)
    x = initial_noise(SHAPE, seed, dtype=torch.float64) * sigmas[0]
    out = sampler(perfect_denoiser, x, sigmas, {"seed": seed + 1}, disable=True, model_sampling=SCHED)
    return sigmas, out


def deviation(name, sigmas, out):
    """Largest of |mean error| and |variance error| in units of their standard errors."""
    _, gamma, boundary, clean = CASES[name]
    m, v = closed_form(sigmas, gamma, boundary, clean)
    n = out.numel()
    return max(abs(out.mean().item() - m) / math.sqrt(v / n), abs(out.var().item() - v) / (v * math.sqrt(2 / n)))


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_closed_form(name, steps):
    sigmas, out = run(name, steps)
    assert deviation(name, sigmas, out) < 5.0
    if steps == 1:  # one step returns E[x0|x] of x = sigma_max*z: variance (s^2/(s^2+sigma^2))^2 sigma^2, not s^2
        sig2 = float(sigmas[0]) ** 2
        assert closed_form(sigmas, *CASES[name][1:])[1] == pytest.approx((S * S / (S * S + sig2)) ** 2 * sig2, rel=1e-6)


# For LCM sigma_s = 0, so sigma_next IS its correct coefficient; only "missing" is wrong there.
@pytest.mark.parametrize("name, steps, wrong", [
    ("lcm", 2, "missing"), ("lcm", 4, "missing"), ("tcd", 2, "missing"), ("tcd", 4, "missing"),
    ("tcd", 2, "sigma_next"), ("tcd", 4, "sigma_next"),
])
def test_wrong_noise_coefficient_is_detected(name, steps, wrong, monkeypatch):
    real = consistency.step_coefficients

    def perturbed(*args, **kwargs):
        c = real(*args, **kwargs)
        bad = torch.where(c.a_z > 0, c.sigma_next, c.a_z) if wrong == "sigma_next" else torch.zeros_like(c.a_z)
        return dataclasses.replace(c, a_z=bad)

    monkeypatch.setattr(consistency, "step_coefficients", perturbed)
    sigmas, out = run(name, steps)
    assert deviation(name, sigmas, out) > 20.0
