"""fewstep kernels: fused consistency step (Triton, lazily imported), sync-free loop, CUDA-graph helper.

Launcher: ``from kernels.consistency_step import consistency_step``.
Pure math: never imports ``comfy``; importing this package never imports ``triton``.
"""
from __future__ import annotations

from .consistency_step import (  # the launcher `consistency_step` is not re-exported: it would shadow the submodule
    COEFF_FIELDS,
    N_COEFFS,
    coefficient_table,
    consistency_step_fallback,
    consistency_step_reference,
    fused_backend,
    fused_step,
    interpreter_enabled,
    triton_available,
)
from .graph import CudaGraphCapturer, GraphCache, GraphKey, allocator_backend, capture_allowed
from .loop import sample_fused, use_fused

__all__ = [
    "COEFF_FIELDS",
    "N_COEFFS",
    "coefficient_table",
    "consistency_step_fallback",
    "consistency_step_reference",
    "fused_backend",
    "fused_step",
    "interpreter_enabled",
    "triton_available",
    "sample_fused",
    "use_fused",
    "GraphKey",
    "GraphCache",
    "CudaGraphCapturer",
    "allocator_backend",
    "capture_allowed",
]
