"""Sync-free fused loop == the straightforward unfused loop; no host reads per step; the switch that picks it."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fewstep.kernels import coefficient_table, consistency_step_reference, sample_fused, triton_available
from fewstep.samplers.discrete import DiscreteSchedule
from fewstep.samplers.parametrisation import parametrisation
from fewstep.samplers.schedules import tcd_timesteps, timesteps_to_sigmas
from fewstep.samplers.step import Step, step_coefficients

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
needs_cuda = lambda f: pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled kernel, sync debug mode")(f))  # noqa: E731


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for each test only (never leaked into other tiers' processes/servers). kernels reads it
    per call and builds the InterpretedFunction itself, so it does not matter whether triton was imported earlier."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


class ToyDenoiser:
    """Deterministic k-diffusion-style denoiser: model(x, sigma * s_in) -> x0."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **extra):
        self.calls.append(extra)
        s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (x / (1 + s * s) + 0.1 * torch.tanh(x) * extra.get("scale", 1.0)).to(x.dtype)


SCHED = DiscreteSchedule(dtype=torch.float64)


def _record(n=4):
    """The one builder's coefficients for TCD gamma 0.3 with the boundary condition (every column varies)."""
    sigmas = timesteps_to_sigmas(tcd_timesteps(n), SCHED)
    return sigmas, step_coefficients(sigmas, parametrisation(SCHED), Step(gamma=0.3, boundary=True))


def _setup(device="cpu", dtype=torch.float32, n=4, shape=(2, 4, 8, 8)):
    sigmas, c = _record(n)
    sigma_s, c_out = c.sigma_s, c.c_out
    c_skipv = c.c_skip / (1 + c.sigma**2).sqrt()
    coeffs = coefficient_table(c, device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * sigmas[0].float()).to(device, dtype)
    noise = torch.randn((n - 1, *shape), generator=g).to(device, dtype)  # a run to sigma 0: last step none
    return sigmas.float().to(device), coeffs, x, noise, (sigmas, sigma_s, c_skipv, c_out)


def unfused_loop(model, x, sigmas, coeffs, noise, extra_args=None, callback=None):
    """The straightforward loop: same model calls and noise rows, reference step."""
    extra_args = extra_args or {}
    n = coeffs.shape[0]
    s_in = x.new_ones([x.shape[0]])
    for i in range(n):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        z = noise[i] if (noise is not None and i < noise.shape[0]) else None
        x_next, x0 = consistency_step_reference(x, denoised, z, coeffs, i)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
        x = x_next
    return x


def textbook_loop(model, x, sigmas64, sigma_s, c_skipv, c_out, noise):
    """The math as written (float64): boundary condition, eps, jump to sigma_s, renoise to sigma_{i+1}."""
    x = x.double()
    n = len(sigmas64) - 1
    for i in range(n):
        d_raw = model(x, sigmas64[i] * x.new_ones([x.shape[0]]))
        D = c_out[i] * d_raw + c_skipv[i] * x
        eps = (x - D) / sigmas64[i]
        x = D + sigma_s[i] * eps
        if i < n - 1:
            x = x + (sigmas64[i + 1] ** 2 - sigma_s[i] ** 2).sqrt() * noise[i].double()
    return x


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fused_loop_equals_unfused_loop(backend):
    sigmas, coeffs, x, noise, _ = _setup()
    ref = unfused_loop(ToyDenoiser(), x, sigmas, coeffs, noise, {"scale": 0.5})
    got = sample_fused(ToyDenoiser(), x, sigmas, coeffs, noise, {"scale": 0.5}, disable=True, backend=backend)
    assert torch.equal(got, ref)  # bit-exact: same fp32 ops in the same order


def test_fused_loop_matches_textbook_math():
    sigmas, coeffs, x, noise, (s64, sigma_s, c_skipv, c_out) = _setup()
    got = sample_fused(ToyDenoiser(), x, sigmas, coeffs, noise, disable=True)
    ref = textbook_loop(ToyDenoiser(), x, s64, sigma_s, c_skipv, c_out, noise)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_callback_dict_and_previews(backend):
    sigmas, coeffs, x, noise, _ = _setup()
    seen, ref_seen = [], []
    sample_fused(ToyDenoiser(), x, sigmas, coeffs, noise, callback=seen.append, disable=True, backend=backend)
    unfused_loop(ToyDenoiser(), x, sigmas, coeffs, noise, callback=ref_seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    for d, r in zip(seen, ref_seen):
        assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert torch.equal(d["x"], r["x"]) and torch.equal(d["denoised"], r["denoised"])
        assert torch.equal(d["sigma"], r["sigma"]) and torch.equal(d["sigma_hat"], d["sigma"])
    assert torch.equal(seen[0]["x"], x)  # x before the update


def test_noise_rows_decide_which_steps_read_noise():
    sigmas, coeffs, x, noise, _ = _setup()
    assert noise.shape[0] == coeffs.shape[0] - 1  # run to sigma 0: the last step reads no noise
    det = sample_fused(ToyDenoiser(), x, sigmas, coeffs, None, disable=True)
    assert torch.equal(det, unfused_loop(ToyDenoiser(), x, sigmas, coeffs, None))
    # A split schedule (SplitSigmas: ends above sigma 0) re-noises on its last step too, with its own row.
    split = coeffs.clone()
    split[-1, 2] = 0.25
    full = torch.cat([noise, -1.5 * noise[:1]])
    got = sample_fused(ToyDenoiser(), x, sigmas, split, full, disable=True)
    assert torch.equal(got, unfused_loop(ToyDenoiser(), x, sigmas, split, full))
    short = sample_fused(ToyDenoiser(), x, sigmas, split, noise, disable=True)
    torch.testing.assert_close(got - short, 0.25 * full[-1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="noise must be"):
        sample_fused(ToyDenoiser(), x, sigmas, coeffs, noise[:-1], disable=True)  # n - 2 rows: ambiguous


def test_no_host_reads_and_op_count_per_step():
    """CPU proxy for 'no sync': no aten._local_scalar_dense (.item()/bool()/float()) anywhere in the loop."""

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    sigmas, coeffs, x, noise, _ = _setup()
    model = lambda x, s: x  # noqa: E731  (1 op per call: nothing)
    counts = {}
    for n in (2, 4):
        with Count() as c:
            sample_fused(model, x, sigmas[: n + 1].clone(), coeffs[:n].clone(), noise[: n - 1], disable=True,
                         backend="torch")
        assert "aten._local_scalar_dense" not in c.ops, c.ops
        counts[n] = len(c.ops)
    per_step = (counts[4] - counts[2]) / 2
    assert per_step <= 20, per_step  # torch fallback: a handful of elementwise ops; the Triton path is 1 launch


def test_the_builders_record_runs_as_its_table():
    """The sampler hands the loop the one builder's record; the loop puts it on the device itself."""
    sigmas, c = _record()
    _, coeffs, x, noise, _ = _setup()
    got = sample_fused(ToyDenoiser(), x, sigmas.float(), c, noise, disable=True, backend="torch")
    assert torch.equal(got, sample_fused(ToyDenoiser(), x, sigmas.float(), coeffs, noise, disable=True, backend="torch"))


def test_argument_checks():
    sigmas, coeffs, x, noise, _ = _setup()
    with pytest.raises(ValueError):
        sample_fused(ToyDenoiser(), x, sigmas[:-1], coeffs, noise, disable=True)
    with pytest.raises(ValueError):
        sample_fused(ToyDenoiser(), x, sigmas, coeffs, noise[:, :1], disable=True)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_fused_loop_no_sync_and_matches(dtype):
    sigmas, coeffs, x, noise, _ = _setup("cuda", dtype, shape=(1, 4, 64, 64))
    model = ToyDenoiser()
    sample_fused(model, x, sigmas, coeffs, noise, disable=True)  # compile both kernel variants first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample_fused(model, x, sigmas, coeffs, noise, disable=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = unfused_loop(model, x, sigmas, coeffs, noise)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
