"""Fused consistency step: one Triton launch per sampling step.

    x_next = a_x * x + a_d * D_raw + a_z * z        x0 = b_x * x + b_d * D_raw

The five coefficients are row ``step`` of a device float32 tensor ``[n_steps, 5]``, columns ``COEFF_FIELDS``: the
table of ``samplers.step.step_coefficients`` (the one builder), put on the device by ``coefficient_table``. ``step``
is a Python int passed to the kernel as a runtime argument, so nothing is read back to the host and one compiled
kernel serves every step.

Layout of this file: coefficient table, kernel source, launcher, pure-PyTorch reference, fallback, dispatcher.

Triton is imported lazily: importing this module never imports ``triton``. The kernel object is built on the
first launch, explicitly as a compiled ``JITFunction`` for CUDA tensors and as an ``InterpretedFunction`` for CPU
tensors under ``TRITON_INTERPRET=1`` (so a test process with ``TRITON_INTERPRET=1`` still runs the real,
compiled kernel on GPU tensors).
"""

from __future__ import annotations  # keeps the `tl.constexpr` annotations below unevaluated until triton is loaded

import logging
import os

import torch

__all__ = [
    "COEFF_FIELDS",
    "N_COEFFS",
    "coefficient_table",
    "consistency_step",
    "consistency_step_reference",
    "consistency_step_fallback",
    "fused_step",
    "fused_backend",
    "triton_available",
    "interpreter_enabled",
]

log = logging.getLogger("fewstep")

#: Env var that lets ``fused_step`` pick the Triton *interpreter* for CPU tensors (needs ``TRITON_INTERPRET=1`` too).
ALLOW_INTERPRETER_ENV = "FEWSTEP_ALLOW_TRITON_INTERPRETER"

#: Column order of the coefficient table: the order the kernel reads a row in (offsets 0-4 below).
COEFF_FIELDS = ("a_x", "a_d", "a_z", "b_x", "b_d")
N_COEFFS = len(COEFF_FIELDS)

_MAX_BLOCK = 1024
_MIN_BLOCK = 128


# --------------------------------------------------------------------------------------------------------------------
# Kernel. `tl` is bound in this module's globals by `_get_kernel` (lazy import); Triton resolves it at compile time.
# --------------------------------------------------------------------------------------------------------------------
def _consistency_step_kernel(
    x_ptr,  # current latent, any float dtype
    d_ptr,  # model output D_raw (x0 after CFG), any float dtype
    z_ptr,  # pre-drawn noise (ignored when HAS_NOISE is False)
    coef_ptr,  # float32 [n_steps, 5]: a_x, a_d, a_z, b_x, b_d
    xn_ptr,  # out: x_next (dtype of x)
    x0_ptr,  # out: x0 / denoised for previews (dtype of x)
    n_elements,
    step,  # runtime int (do_not_specialize): one compiled kernel for every step
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 offsets: batch * C * H * W (* T) can exceed 2**31 for video latents.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements

    row = coef_ptr + step * 5
    a_x = tl.load(row + 0)
    a_d = tl.load(row + 1)
    b_x = tl.load(row + 3)
    b_d = tl.load(row + 4)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    x0 = b_x * x + b_d * d
    xn = a_x * x + a_d * d
    if HAS_NOISE:
        a_z = tl.load(row + 2)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xn = xn + a_z * z

    tl.store(xn_ptr + offs, xn.to(xn_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


_TRITON = None  # cached import result: module, or False when the import failed
_KERNELS: dict[bool, object] = {}  # interpret? -> JITFunction / InterpretedFunction
_TRITON_BROKEN: str | None = None  # set when a real CUDA launch failed once; fused_step then stays on torch


def _import_triton():
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON = triton
        except Exception as e:  # ImportError, or a broken install raising at import time
            log.debug("fewstep kernels: triton unavailable (%s: %s)", type(e).__name__, e)
            _TRITON = False
    return _TRITON


def triton_available() -> bool:
    """True when ``import triton`` works (the result is cached for the process)."""
    return bool(_import_triton())


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _get_kernel(interpret: bool):
    kernel = _KERNELS.get(interpret)
    if kernel is None:
        triton = _import_triton()
        if not triton:
            raise RuntimeError("fewstep consistency_step: triton is not importable; use fused_step() for the torch fallback")
        globals()["tl"] = triton.language
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as Wrapper
        else:
            from triton.runtime.jit import JITFunction as Wrapper
        kernel = Wrapper(_consistency_step_kernel, do_not_specialize=["step"])
        _KERNELS[interpret] = kernel
    return kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps). 1024 elements per program (8 fp32 per thread at 4 warps); smaller for tiny tensors."""
    block = _MAX_BLOCK if n >= _MAX_BLOCK else max(_MIN_BLOCK, 1 << (max(n, 1) - 1).bit_length())
    return block, max(1, min(4, block // 256))


def _check_args(x, denoised, noise, coeffs, step) -> int:
    """Host-side checks from metadata only (no device reads). Returns the normalised step index."""
    if denoised.shape != x.shape:
        raise ValueError(f"consistency_step: denoised shape {tuple(denoised.shape)} != x shape {tuple(x.shape)}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"consistency_step: noise shape {tuple(noise.shape)} != x shape {tuple(x.shape)}")
    for name, t in (("x", x), ("denoised", denoised), ("noise", noise)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"consistency_step: {name} must be a floating tensor, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"consistency_step: {name} is on {t.device}, x is on {x.device}")
    if coeffs.ndim != 2 or coeffs.shape[1] != N_COEFFS:
        raise ValueError(f"consistency_step: coeffs must be [n_steps, {N_COEFFS}], got {tuple(coeffs.shape)}")
    if isinstance(step, torch.Tensor):
        raise TypeError("consistency_step: step must be a Python int (a tensor index would force a host sync)")
    step = int(step)
    n_steps = coeffs.shape[0]
    if not -n_steps <= step < n_steps:
        raise IndexError(f"consistency_step: step {step} out of range for {n_steps} coefficient rows")
    return step % n_steps


def coefficient_table(coeffs, device) -> torch.Tensor:
    """The kernel's ``[n_steps, 5]`` float32 table on ``device`` from any record with the ``COEFF_FIELDS`` attributes
    (``samplers.step.StepCoefficients``: float64 CPU tensors). A pre-loop copy; nothing is read back."""
    table = torch.stack([torch.as_tensor(getattr(coeffs, f), dtype=torch.float64) for f in COEFF_FIELDS], dim=1)
    return table.to(torch.float32).to(device).contiguous()  # cast on the CPU: MPS has no float64


# --------------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------------
def consistency_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor | None,
    coeffs: torch.Tensor,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused step with the Triton kernel: returns ``(x_next, x0)`` in ``x.dtype``. Exactly one launch.

    ``x``/``denoised``/``noise`` may have different float dtypes (fp32/fp16/bf16); math is fp32. ``noise=None``
    compiles the ``HAS_NOISE=False`` variant (last step). Needs CUDA tensors, or CPU tensors with
    ``TRITON_INTERPRET=1`` (the interpreter). Non-contiguous inputs are made contiguous first (an extra copy; the
    sampler's tensors are contiguous so this never happens there).
    """
    step = _check_args(x, denoised, noise, coeffs, step)
    _check_kernel_coeffs(coeffs, x)
    if x.is_cuda:
        interpret = False
    elif x.device.type == "cpu" and interpreter_enabled():
        interpret = True
    else:
        raise RuntimeError(
            f"consistency_step: the Triton kernel needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
            f"(got {x.device}); call fused_step() to fall back to torch automatically"
        )
    kernel = _get_kernel(interpret)

    # Flatten: the kernel indexes a contiguous 1-D view. `.contiguous()` is a no-op for contiguous tensors.
    xc, dc = x.contiguous(), denoised.contiguous()
    zc = noise.contiguous() if noise is not None else xc  # dummy pointer, never read when HAS_NOISE=False
    coeffs = coeffs.contiguous()
    xn, x0 = torch.empty_like(xc), torch.empty_like(xc)

    n = xc.numel()
    if n > 0:
        block, num_warps = _launch_config(n)
        grid = (_cdiv(n, block),)
        if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                kernel[grid](xc, dc, zc, coeffs, xn, x0, n, step, HAS_NOISE=noise is not None, BLOCK=block, num_warps=num_warps)
        else:
            kernel[grid](xc, dc, zc, coeffs, xn, x0, n, step, HAS_NOISE=noise is not None, BLOCK=block, num_warps=num_warps)
    return xn, x0


def _check_kernel_coeffs(coeffs: torch.Tensor, x: torch.Tensor) -> None:
    if coeffs.dtype != torch.float32 or coeffs.device != x.device:
        raise ValueError(
            f"consistency_step: coeffs must be float32 on {x.device} (got {coeffs.dtype} on {coeffs.device}); "
            "build them once with coefficient_table(coeffs, x.device)"
        )


# --------------------------------------------------------------------------------------------------------------------
# Reference / fallback
# --------------------------------------------------------------------------------------------------------------------
def consistency_step_reference(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor | None,
    coeffs: torch.Tensor,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of ``consistency_step``: same math and operation order, fp32 compute, then cast.

    Works on any device; ``coeffs`` may live on the CPU or on ``x.device`` (indexing row ``step`` with a Python
    int is a view, so nothing is read back to the host).
    """
    step = _check_args(x, denoised, noise, coeffs, step)
    a_x, a_d, a_z, b_x, b_d = coeffs[step].to(torch.float32).unbind(0)
    xf, df = x.float(), denoised.float()
    x0 = b_x * xf + b_d * df
    xn = a_x * xf + a_d * df
    if noise is not None:
        xn = xn + a_z * noise.float()
    return xn.to(x.dtype), x0.to(x.dtype)


#: Used whenever Triton cannot run (no triton, CPU/MPS tensors without the interpreter). Same math as the kernel.
consistency_step_fallback = consistency_step_reference


# --------------------------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------------------------
def _interpreter_allowed(allow_interpreter: bool | None) -> bool:
    if allow_interpreter is not None:
        return bool(allow_interpreter)
    return os.environ.get(ALLOW_INTERPRETER_ENV, "0") == "1"


def fused_backend(x: torch.Tensor, *, allow_interpreter: bool | None = None) -> str:
    """``"triton"`` when the Triton kernel will run for ``x``, else ``"torch"``.

    Triton: ``x`` is a CUDA tensor and triton imports (and no CUDA launch has failed in this process), or
    ``x`` is a CPU tensor, ``TRITON_INTERPRET=1``, triton imports, and the interpreter is allowed
    (``allow_interpreter=True`` or env ``FEWSTEP_ALLOW_TRITON_INTERPRETER=1``; the interpreter is slow, so a stray
    ``TRITON_INTERPRET=1`` alone never routes real sampling through it).
    """
    if x.is_cuda:
        return "triton" if (_TRITON_BROKEN is None and triton_available()) else "torch"
    if x.device.type == "cpu" and interpreter_enabled() and _interpreter_allowed(allow_interpreter) and triton_available():
        return "triton"
    return "torch"


def fused_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor | None,
    coeffs: torch.Tensor,
    step: int,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused step on the best backend: ``backend=None``/``"auto"`` uses ``fused_backend(x)``; ``"triton"`` or
    ``"torch"`` force one. If a real (CUDA) Triton launch raises, that is logged once, the process stays on the
    torch fallback from then on, and this call's result comes from the fallback.
    """
    global _TRITON_BROKEN
    if backend in (None, "auto"):
        backend = fused_backend(x)
    if backend == "torch":
        return consistency_step_fallback(x, denoised, noise, coeffs, step)
    if backend != "triton":
        raise ValueError(f"fused_step: backend must be None, 'auto', 'triton' or 'torch', got {backend!r}")
    if not x.is_cuda:
        return consistency_step(x, denoised, noise, coeffs, step)
    if _TRITON_BROKEN is not None:  # a launch already failed in this process: no retry (and no repeated warning)
        return consistency_step_fallback(x, denoised, noise, coeffs, step)
    # Argument errors surface as errors (checked here, before the launch); anything the launch itself raises --
    # including a ValueError from Triton, e.g. kernel sources missing from the install -- is a backend failure.
    _check_args(x, denoised, noise, coeffs, step)
    _check_kernel_coeffs(coeffs, x)
    try:
        return consistency_step(x, denoised, noise, coeffs, step)
    except Exception as e:  # compile / driver failure (e.g. GPU arch unsupported by this triton)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        _TRITON_BROKEN = f"{type(e).__name__}: {e}"
        log.warning("fewstep: Triton consistency step failed (%s); using the torch fallback from now on", _TRITON_BROKEN)
        return consistency_step_fallback(x, denoised, noise, coeffs, step)
