"""fewstep kernels: fused consistency step (Triton, lazily imported), sync-free loop, CUDA-graph helper.

Launcher: ``from kernels.consistency_step import consistency_step``.
Pure math: never imports ``comfy``; importing this package never imports ``triton``.
"""
from __future__ import annotations

from .coefficients import COEFF_FIELDS, N_COEFFS, linear_coefficients
from .consistency_step import (  # the launcher `consistency_step` is not re-exported: it would shadow the submodule
    consistency_step_fallback,
    consistency_step_reference,
    fused_backend,
    fused_step,
    interpreter_enabled,
    triton_available,
)
from .graph import CudaGraphCapturer, GraphCache, GraphKey, allocator_backend, capture_allowed
from .loop import sample_fused

__all__ = [
    "COEFF_FIELDS",
    "N_COEFFS",
    "linear_coefficients",
    "consistency_step_fallback",
    "consistency_step_reference",
    "fused_backend",
    "fused_step",
    "interpreter_enabled",
    "triton_available",
    "sample_fused",
    "GraphKey",
    "GraphCache",
    "CudaGraphCapturer",
    "allocator_backend",
    "capture_allowed",
]
