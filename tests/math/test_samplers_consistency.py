"""The sampling run: callback x0, the coefficient table == the loop, model_sampling lookup, errors."""
from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from fewstep.samplers import SAMPLERS, consistency
from fewstep.samplers.consistency import sample_consistency
from fewstep.samplers.discrete import DiscreteSchedule
from fewstep.samplers.lcm import sample_lcm
from fewstep.samplers.noise import BatchStepNoise
from fewstep.samplers.parametrisation import parametrisation, resolve_model_sampling
from fewstep.samplers.pcm import sample_pcm
from fewstep.samplers.presets import PRESET_NAMES, PRESETS, get_preset
from fewstep.samplers.schedules import lcm_timesteps, pcm_phase_timesteps, tcd_timesteps, timesteps_to_sigmas
from fewstep.samplers.step import Step, step_coefficients
from fewstep.samplers.tcd import sample_tcd

SCHED = DiscreteSchedule(dtype=torch.float64)
VP = parametrisation(SCHED)


def denoiser(x, sigma, **_):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(x / (1.0 + s * s).sqrt()) + 0.05 * s


class HostModel:
    def __init__(self, ms):
        self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))

    def __call__(self, x, sigma, **extra):
        return denoiser(x, sigma)


def _x(sigma0, shape=(2, 4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * float(sigma0)


@pytest.mark.parametrize(
    "sampler, kwargs, boundary",
    [(sample_lcm, {}, True), (sample_tcd, {"gamma": 0.3}, False), (sample_pcm, {}, False)],
)
def test_callback_denoised_is_x0_every_step(sampler, kwargs, boundary):
    sigmas = timesteps_to_sigmas(lcm_timesteps(4), SCHED)
    seen = []
    x = _x(sigmas[0])
    out = sampler(HostModel(SCHED), x, sigmas, {"seed": 3}, seen.append, True, **kwargs)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    for d in seen:
        assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert d["sigma"] == d["sigma_hat"] == sigmas[d["i"]]
        raw = denoiser(d["x"], d["sigma"].reshape(1).expand(2))
        expected = raw
        if boundary:
            t = float(SCHED.timestep(d["sigma"]))
            c_skip, c_out = 0.25 / ((10 * t) ** 2 + 0.25), 10 * t / math.sqrt((10 * t) ** 2 + 0.25)
            expected = c_out * raw + c_skip * d["x"] / math.sqrt(1 + float(d["sigma"]) ** 2)
        torch.testing.assert_close(d["denoised"], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, seen[-1]["denoised"], rtol=0, atol=0)  # final_step="x0": clean D


@pytest.mark.parametrize("gamma, boundary, clean, final_step", [
    (0.3, False, False, "x0"), (0.3, False, False, "diffusers"), (1.0, True, True, "x0"),
    (0.0, False, False, "diffusers"), (0.7, True, False, "diffusers"),
])
def test_coefficients_equal_loop_and_textbook_formula(gamma, boundary, clean, final_step):
    sigmas = timesteps_to_sigmas(tcd_timesteps(5), SCHED)
    record = []

    class Recorder:
        """Records each draw under the step it is for (the sampler names the step's sigmas)."""

        def __init__(self):
            self.noise = BatchStepNoise(torch.zeros(2, 4, 6, 6, dtype=torch.float64), 9)
            self.z = {}

        def __call__(self, s, sn):
            z = self.noise(s, sn)
            self.z[sigmas.tolist().index(float(s))] = z
            return z

    def model(x, sigma, **_):
        d = denoiser(x, sigma)
        record.append((x, d))
        return d

    rec = Recorder()
    out = sample_consistency(model, _x(sigmas[0]), sigmas, None, None, True, gamma=gamma, boundary=boundary,
                             final_step=final_step, clean_intermediate=clean, noise_sampler=rec, model_sampling=SCHED)
    c = step_coefficients(sigmas, VP, Step(gamma, boundary, clean), final_step)
    lin = c
    xs = [x for x, _ in record] + [out]
    for i, (x, d_raw) in enumerate(record):
        z = rec.z.get(i, torch.zeros_like(x))
        fused = lin.a_x[i].item() * x + lin.a_d[i].item() * d_raw + lin.a_z[i].item() * z
        torch.testing.assert_close(fused, xs[i + 1], rtol=0, atol=1e-12)
        # textbook form: D (boundary), eps, x_s, re-noise, VP scale on the diffusers final step
        sig, sn = sigmas[i].item(), sigmas[i + 1].item()
        d = c.c_out[i].item() * d_raw + c.c_skip[i].item() * x / math.sqrt(1 + sig**2)
        eps = (x - d) / sig
        if sn > 0:
            t_next = SCHED.timestep(sigmas[i + 1]).item()
            s = math.floor((1 - gamma) * t_next)
            sigma_s = 0.0 if clean else (sn if s == t_next else SCHED.sigma(torch.tensor(float(s))).item())
            ref = d + sigma_s * eps + math.sqrt(sn**2 - sigma_s**2) * z
        elif final_step == "x0":
            ref = d
        else:
            sigma_s = 0.0 if clean else SCHED.sigmas[0].item()
            ref = (d + sigma_s * eps) / math.sqrt(1 + sigma_s**2)
        torch.testing.assert_close(ref, xs[i + 1], rtol=0, atol=1e-10)
    assert set(rec.z) == {i for i in range(5) if lin.a_z[i] > 0}
    assert torch.equal(lin.b_d, c.c_out) and torch.equal(lin.b_x, c.c_skip / (1 + c.sigma**2).sqrt())


def test_reference_tcd_s_values_and_gamma_zero_is_euler_off_grid():
    c = step_coefficients(timesteps_to_sigmas(lcm_timesteps(4), SCHED), VP, Step(gamma=0.3))
    assert c.t.tolist() == [999, 759, 499, 259] and c.s.tolist() == [531, 349, 181, 0]
    assert c.a_z[-1] == 0 and c.sigma_s[-1] == 0  # final_step x0
    # karras-like off-grid sigmas: gamma 0 is exactly deterministic Euler
    sigmas = torch.tensor([14.0, 6.1, 2.3, 0.9, 0.31, 0.0], dtype=torch.float64)
    x = _x(sigmas[0])
    out = sample_consistency(denoiser, x, sigmas, gamma=0.0, disable=True, model_sampling=SCHED,
                             noise_sampler=lambda *a: pytest.fail("gamma=0 must not draw noise"))
    ref = x
    for i in range(len(sigmas) - 1):
        d = denoiser(ref, sigmas[i].reshape(1).expand(2))
        ref = ref + (sigmas[i + 1] - sigmas[i]) * (ref - d) / sigmas[i]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_default_noise_uses_seed_and_the_one_noise_input():
    sigmas = timesteps_to_sigmas(lcm_timesteps(4), SCHED)
    x = _x(sigmas[0])
    a = sample_tcd(HostModel(SCHED), x, sigmas, {"seed": 5}, disable=True)
    b = sample_tcd(HostModel(SCHED), x, sigmas, {"seed": 5}, disable=True)
    c = sample_tcd(HostModel(SCHED), x, sigmas, {"seed": 6}, disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    calls = []

    class Given:
        def __init__(self, x_like, seed):
            self.noise = BatchStepNoise(x_like, seed)

        def __call__(self, sigma, sigma_next):
            calls.append(float(sigma))
            return self.noise(sigma, sigma_next)

    # a given noise_sampler is the one noise input: it replaces the default (per-seed) noise, called once per
    # stochastic step with that step's sigmas, in step order
    d = sample_tcd(HostModel(SCHED), x, sigmas, {"seed": 99}, disable=True, noise_sampler=Given(x, 5))
    assert calls == sigmas[:3].tolist() and torch.equal(a, d)
    sample_pcm(HostModel(SCHED), x, timesteps_to_sigmas(pcm_phase_timesteps(4), SCHED), {"seed": 5}, disable=True)
    # image k of a batch equals that image alone only with batch_offset; the default uses offset 0 for x[0]
    solo = sample_tcd(HostModel(SCHED), x[:1], sigmas, {"seed": 5}, disable=True)
    torch.testing.assert_close(solo, a[:1], rtol=0, atol=1e-12)


def test_model_sampling_resolution_and_rejections():
    assert resolve_model_sampling(HostModel(SCHED)) is SCHED
    assert resolve_model_sampling(object(), SCHED) is SCHED
    with pytest.raises(ValueError, match="model: cannot find model_sampling"):
        resolve_model_sampling(denoiser)

    class ModelSamplingDiscreteFlow(DiscreteSchedule):
        pass

    class CONST:
        pass

    class ModelSamplingAdvanced(DiscreteSchedule, CONST):
        pass

    for bad in (ModelSamplingDiscreteFlow(), ModelSamplingAdvanced(), types.SimpleNamespace(sigma=abs, timestep=abs)):
        with pytest.raises(ValueError, match="need a discrete VP"):
            resolve_model_sampling(HostModel(bad))


def test_argument_errors():
    sigmas = timesteps_to_sigmas(lcm_timesteps(4), SCHED)
    x = _x(sigmas[0])
    kw = dict(disable=True, model_sampling=SCHED)
    with pytest.raises(ValueError, match="gamma"):
        sample_consistency(denoiser, x, sigmas, gamma=1.5, **kw)
    with pytest.raises(ValueError, match="final_step"):
        sample_consistency(denoiser, x, sigmas, final_step="clean", **kw)
    for bad in (sigmas.flip(0), torch.tensor([3.0, 3.0, 0.0]), torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="sigmas"):
            sample_consistency(denoiser, x, bad.double(), **kw)
    # one sigma is no step: said plainly (a SplitSigmas at the end), instead of returning x untouched
    with pytest.raises(ValueError, match=r"fewstep consistency sampler: the sigmas input has 1 value"):
        sample_consistency(denoiser, x, sigmas[:1], **kw)
    with pytest.raises(ValueError, match="gamma must be in"):
        Step(gamma=-0.1)


def test_coefficient_shapes_and_dataclass():
    c = step_coefficients(timesteps_to_sigmas(lcm_timesteps(8), SCHED), VP, Step(0.5, True))
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        assert v.dtype == torch.float64 and v.device.type == "cpu" and v.shape == (8,)
    assert float(c.c_skip.max()) < 1e-6 and float(c.c_out.min()) > 0.99999


def test_presets_table():
    assert len(PRESET_NAMES) == len(set(PRESET_NAMES)) == len(PRESETS)
    assert get_preset("TCD").gamma == 0.3
    assert get_preset("LCM-LoRA").cfg == 1.5 and get_preset("LCM-LoRA").steps == 4
    assert get_preset("PCM normalcfg 4-step").cfg == 3.0 and get_preset("PCM normalcfg 8-step").cfg == 4.5
    assert get_preset("Hyper-SDXL 1-step UNet").fixed_timesteps == (800,)
    assert get_preset("Hyper-SD 1-step unified").gamma == 1.0
    assert get_preset("Hyper-SD CFG 12-step").cfg == 5.0
    for p in PRESETS:
        assert p.sampler in ("lcm", "tcd", "pcm", "euler") and p.schedule in ("lcm", "tcd", "pcm", "trailing", "fixed")
        assert p.sampler in SAMPLERS  # one name for one step: the preset names the sampler that runs it
        assert 0.0 <= p.gamma <= 1.0 and p.steps >= 1
        assert p.schedule != "pcm" or p.phases == p.steps
    with pytest.raises(ValueError, match="valid names: LCM-LoRA"):
        get_preset("nope")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("TCD").gamma = 1.0


def test_samplers_package_never_imports_comfy():
    import pathlib

    for path in pathlib.Path(consistency.__file__).parent.glob("*.py"):
        src = path.read_text()
        assert "import comfy" not in src and "from comfy" not in src, path
