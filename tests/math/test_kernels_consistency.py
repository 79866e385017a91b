"""Fused consistency step: Triton kernel (interpreter on CPU, compiled on GPU) vs the PyTorch reference."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fewstep.kernels.consistency_step as cs
from fewstep.kernels.consistency_step import consistency_step
from fewstep.kernels import (
    COEFF_FIELDS,
    coefficient_table,
    consistency_step_fallback,
    consistency_step_reference,
    fused_backend,
    fused_step,
    triton_available,
    use_fused,
)
from fewstep.samplers.discrete import DiscreteSchedule
from fewstep.samplers.parametrisation import parametrisation
from fewstep.samplers.schedules import tcd_timesteps, timesteps_to_sigmas
from fewstep.samplers.step import Step, step_coefficients

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
needs_cuda = lambda f: pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled Triton kernel")(f))  # noqa: E731


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for each test only (never leaked into other tiers' processes/servers). kernels reads it
    per call and builds the InterpretedFunction itself, so it does not matter whether triton was imported earlier."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


SHAPES = [(1,), (7,), (3, 4, 17, 13), (2, 4, 5, 9, 11), (3 * 1024 + 77,)]  # last: > BLOCK, not a multiple of it
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


SCHED = DiscreteSchedule(dtype=torch.float64)
VP = parametrisation(SCHED)


def _coeffs(n=4, device="cpu"):
    """The kernel's table from the one builder: TCD gamma 0.3 with the boundary condition on, so every column
    varies, and the record it came from."""
    sigmas = timesteps_to_sigmas(tcd_timesteps(n), SCHED)
    c = step_coefficients(sigmas, VP, Step(gamma=0.3, boundary=True))
    return coefficient_table(c, device), c



def _inputs(shape, dtype, device="cpu", seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, d, z = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return x, d, z


# ---------------------------------------------------------------------------------------------------- coefficients
def test_coefficient_layout_matches_textbook_step():
    """The kernel's table (columns COEFF_FIELDS) is the one builder's record, and a row applied as the kernel does
    is the textbook step: boundary condition, eps, jump to sigma_s, re-noise to sigma_{i+1}."""
    coeffs, c = _coeffs()
    assert coeffs.shape == (4, 5) and coeffs.dtype == torch.float32 and COEFF_FIELDS == ("a_x", "a_d", "a_z", "b_x", "b_d")
    sigmas, sigma_s, c_out = torch.cat([c.sigma, c.sigma_next[-1:]]), c.sigma_s, c.c_out
    c_skipv = c.c_skip / (1 + c.sigma**2).sqrt()
    g = torch.Generator().manual_seed(3)
    x, d_raw, z = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    for i in range(4):
        D = c_out[i] * d_raw + c_skipv[i] * x
        eps = (x - D) / sigmas[i]
        n_i = torch.sqrt(sigmas[i + 1] ** 2 - sigma_s[i] ** 2) if i < 3 else torch.tensor(0.0, dtype=torch.float64)
        x_next = D + sigma_s[i] * eps + n_i * z
        a_x, a_d, a_z, b_x, b_d = coeffs[i].double()
        torch.testing.assert_close(a_x * x + a_d * d_raw + a_z * z, x_next, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b_x * x + b_d * d_raw, D, atol=1e-6, rtol=1e-6)
    assert coeffs[-1, 2] == 0  # no noise on the last step


def test_coefficients_defaults_and_edge_cases():
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    c = coefficient_table(step_coefficients(sigmas, VP, Step(1.0, False, True)), "cpu")  # LCM, no boundary: x = D
    torch.testing.assert_close(c, torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0]]))
    assert torch.isfinite(c).all()
    c = step_coefficients(sigmas, VP, Step(0.0))  # gamma 0: sigma_s is sigma_{i+1} itself, so no re-noise
    assert c.a_z.tolist() == [0.0, 0.0] and c.sigma_s[0] == 1.0
    with pytest.raises(ValueError):
        step_coefficients(torch.tensor([1.0, 2.0]), VP, Step())
    with pytest.raises(ValueError):
        step_coefficients(torch.tensor([1.0]), VP, Step())
    with pytest.raises(AttributeError):
        coefficient_table(object(), "cpu")


# ---------------------------------------------------------------------------------------------------- interpreter
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    coeffs, _ = _coeffs()
    x, d, z = _inputs(shape, dtype)
    got = consistency_step(x, d, z, coeffs, 1)
    ref = consistency_step_reference(x, d, z, coeffs, 1)
    for g, r in zip(got, ref):
        assert g.dtype == dtype and g.shape == x.shape
        torch.testing.assert_close(g.float(), r.float(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_without_noise(dtype):
    coeffs, _ = _coeffs()
    x, d, _ = _inputs((3, 4, 17, 13), dtype)
    got = consistency_step(x, d, None, coeffs, 3)
    ref = consistency_step_reference(x, d, None, coeffs, 3)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.float(), r.float(), **TOL[dtype])
    # HAS_NOISE=False must equal a zero noise tensor, for any a_z
    zero = consistency_step_reference(x, d, torch.zeros_like(x), coeffs, 1)
    torch.testing.assert_close(consistency_step(x, d, None, coeffs, 1)[0].float(), zero[0].float(), **TOL[dtype])


@needs_triton
def test_kernel_reads_row_step():
    coeffs, _ = _coeffs()
    x, d, z = _inputs((7,), torch.float32)
    outs = [consistency_step(x, d, z, coeffs, i)[0] for i in range(4)]
    for i in range(4):
        a_x, a_d, a_z, _, _ = coeffs[i]
        torch.testing.assert_close(outs[i], a_x * x + a_d * d + a_z * z, atol=1e-6, rtol=1e-6)
    assert not torch.equal(outs[1], outs[2])
    torch.testing.assert_close(consistency_step(x, d, z, coeffs, -1)[0], outs[3])


@needs_triton
def test_kernel_bit_exact_fp32_on_cpu():
    coeffs, _ = _coeffs()
    x, d, z = _inputs((2, 4, 5, 9, 11), torch.float32)
    for g, r in zip(consistency_step(x, d, z, coeffs, 2), consistency_step_reference(x, d, z, coeffs, 2)):
        assert torch.equal(g, r)


@needs_triton
def test_kernel_mixed_dtypes_and_noncontiguous():
    coeffs, _ = _coeffs()
    x, d, z = _inputs((2, 4, 8, 6), torch.float16)
    d32 = d.float()  # model output in fp32, latent in fp16
    ref = consistency_step_reference(x, d32, z, coeffs, 1)
    got = consistency_step(x, d32, z, coeffs, 1)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)
    # non-contiguous inputs
    xt, dt, zt = (t.float().transpose(1, 3) for t in (x, d, z))
    assert not xt.is_contiguous()
    got = consistency_step(xt, dt, zt, coeffs, 0)
    ref = consistency_step_reference(xt, dt, zt, coeffs, 0)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-6)


@needs_triton
def test_exactly_one_launch_per_step(monkeypatch):
    coeffs, _ = _coeffs()
    x, d, z = _inputs((3 * 1024 + 77,), torch.float32)
    real = cs._get_kernel(True)
    launches = []

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setitem(cs._KERNELS, True, Counting())
    consistency_step(x, d, z, coeffs, 0)
    consistency_step(x, d, None, coeffs, 3)
    assert launches == [(4,), (4,)]


def test_errors(monkeypatch):
    coeffs, _ = _coeffs()
    x, d, z = _inputs((7,), torch.float32)
    with pytest.raises(ValueError):
        consistency_step(x, d, z, coeffs.double(), 0)
    with pytest.raises(ValueError):
        consistency_step_reference(x, d[:3], z, coeffs, 0)
    with pytest.raises(ValueError):
        consistency_step_reference(x, d, z, coeffs[:, :4], 0)
    with pytest.raises(TypeError):
        consistency_step_reference(x, d, z, coeffs, torch.tensor(0))
    with pytest.raises(IndexError):
        consistency_step_reference(x, d, z, coeffs, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        consistency_step(x, d, z, coeffs, 0)


def test_dispatch(monkeypatch):
    x = torch.zeros(3)
    assert consistency_step_fallback is consistency_step_reference
    monkeypatch.delenv(cs.ALLOW_INTERPRETER_ENV, raising=False)
    assert fused_backend(x) == "torch"  # TRITON_INTERPRET=1 alone never routes sampling through the interpreter
    assert fused_backend(x, allow_interpreter=True) == ("triton" if triton_available() else "torch")
    monkeypatch.setenv(cs.ALLOW_INTERPRETER_ENV, "1")
    assert fused_backend(x) == ("triton" if triton_available() else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fused_backend(x) == "torch"
    # the torch path never touches the Triton launcher
    monkeypatch.setattr(cs, "consistency_step", lambda *a, **k: pytest.fail("triton path taken"))
    coeffs, _ = _coeffs()
    ref = consistency_step_reference(x, x + 1, x + 2, coeffs, 0)
    got = fused_step(x, x + 1, x + 2, coeffs, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(ValueError):
        fused_step(x, x, x, coeffs, 0, backend="cuda")


def test_import_is_lazy():
    code = "import sys, kernels; kernels.fused_backend(__import__('torch').zeros(1)); " \
           "assert 'triton' not in sys.modules and 'comfy' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)


@needs_triton
def test_interpreter_works_when_triton_was_imported_first():
    """Other test modules or the host may import triton before TRITON_INTERPRET=1 is set."""
    code = ("import os, torch, triton; os.environ['TRITON_INTERPRET'] = '1'; "
            "from kernels.consistency_step import consistency_step as f, consistency_step_reference as r; "
            "c = torch.tensor([[0.25, 0.75, 0.866, 0.01, 0.99], [0.0, 1.0, 0.0, 0.0, 1.0]]); "
            "x = torch.randn(1500); a = f(x, x * 2, x * 3, c, 0); b = r(x, x * 2, x * 3, c, 0); "
            "assert all(torch.equal(u, v) for u, v in zip(a, b))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)


@needs_triton
def test_compiles_for_sm90_without_a_gpu():
    """The compiled (non-interpreted) kernel lowers to PTX/cubin; catches errors the interpreter tolerates."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:  # pragma: no cover - triton API drift
        pytest.skip(f"triton compile API unavailable: {e}")
    kernel = cs._get_kernel(False)
    for dt, has_noise in (("fp16", True), ("bf16", False)):
        sig = {"x_ptr": f"*{dt}", "d_ptr": "*fp32", "z_ptr": f"*{dt}", "coef_ptr": "*fp32", "xn_ptr": f"*{dt}",
               "x0_ptr": f"*{dt}", "n_elements": "i64", "step": "i32", "HAS_NOISE": "constexpr", "BLOCK": "constexpr"}
        compiled = triton.compile(ASTSource(kernel, sig, constexprs={"HAS_NOISE": has_noise, "BLOCK": 1024}),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        assert "st.global" in ptx and ("cubin" in compiled.asm)


# ---------------------------------------------------------------------------------------------------- GPU
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 4, 128, 128)], ids=str)
def test_cuda_kernel_matches_reference(shape, dtype):
    coeffs, _ = _coeffs(device="cuda")
    x, d, z = _inputs(shape, dtype, device="cuda")
    assert fused_backend(x) == "triton"
    for noise in (z, None):
        got = fused_step(x, d, noise, coeffs, 2)
        ref = consistency_step_reference(x, d, noise, coeffs, 2)
        tol = TOL[dtype] if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)  # FMA contraction on the GPU
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.float(), r.float(), **tol)


@needs_cuda
@needs_triton
def test_cuda_kernel_no_sync():
    coeffs, _ = _coeffs(device="cuda")
    x, d, z = _inputs((2, 4, 64, 64), torch.float16, device="cuda")
    fused_step(x, d, z, coeffs, 0)  # compile outside the check
    fused_step(x, d, None, coeffs, 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4):
            x, _ = fused_step(x, d, z if i < 3 else None, coeffs, i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


class FakeCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, to reach fused_step's CUDA-only branches on a machine without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_failed_launch_is_not_retried(monkeypatch, caplog):
    """After a CUDA launch fails (e.g. an architecture this triton cannot compile for), later steps go straight to
    the torch fallback: one attempt and one warning per process, not one per step."""
    import logging

    monkeypatch.setattr(cs, "_TRITON_BROKEN", None)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("ptxas fatal: unsupported gpu architecture")
    monkeypatch.setattr(cs, "consistency_step", broken)
    coeffs, _ = _coeffs()
    x, d, z = _inputs((7,), torch.float32)
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        for step in range(4):
            got = fused_step(x.as_subclass(FakeCuda), d, z if step < 3 else None, coeffs, step, backend="triton")
            ref = consistency_step_reference(x, d, z if step < 3 else None, coeffs, step)
            assert torch.equal(got[0].as_subclass(torch.Tensor), ref[0])
    assert len(calls) == 1 and cs._TRITON_BROKEN.startswith("RuntimeError: ptxas")
    assert len([r for r in caplog.records if "Triton consistency step failed" in r.getMessage()]) == 1


def test_triton_value_error_falls_back_but_argument_errors_raise(monkeypatch):
    """A ValueError raised by Triton itself (e.g. '@jit functions should be defined in a Python file' when sources
    are not shipped) is a backend failure: torch fallback. Bad arguments still raise before any launch."""
    monkeypatch.setattr(cs, "_TRITON_BROKEN", None)

    def triton_says_no(*a, **k):
        raise ValueError("@jit functions should be defined in a Python file")
    monkeypatch.setattr(cs, "consistency_step", triton_says_no)
    coeffs, _ = _coeffs()
    x, d, z = _inputs((7,), torch.float32)
    got = fused_step(x.as_subclass(FakeCuda), d, z, coeffs, 0, backend="triton")
    assert torch.equal(got[0].as_subclass(torch.Tensor), consistency_step_reference(x, d, z, coeffs, 0)[0])
    assert cs._TRITON_BROKEN.startswith("ValueError: @jit")
    monkeypatch.setattr(cs, "_TRITON_BROKEN", None)
    with pytest.raises(IndexError):
        fused_step(x.as_subclass(FakeCuda), d, z, coeffs, 9, backend="triton")
    with pytest.raises(ValueError, match="coeffs must be float32"):
        fused_step(x.as_subclass(FakeCuda), d, z, coeffs.double(), 0, backend="triton")
    assert cs._TRITON_BROKEN is None


def test_fused_on_says_which_requirement_is_missing(monkeypatch):
    """fused=on on a CPU latent names the latent's device; on a GPU latent without triton it names triton."""
    with pytest.raises(ValueError, match=r"fused=on, but the latent is on cpu, and the fused kernel runs on CUDA"):
        use_fused("on", torch.zeros(1))
    assert use_fused("auto", torch.zeros(1)) is False and use_fused("off", torch.zeros(1)) is False

    monkeypatch.setattr(cs, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"triton cannot be imported"):
        use_fused("on", torch.zeros(1).as_subclass(FakeCuda))
    assert use_fused("auto", torch.zeros(1).as_subclass(FakeCuda)) is False
