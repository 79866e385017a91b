"""Per-step cost of the fused consistency step vs the PyTorch reference.

    python -m bench.bench_step_kernels [--iters 200]

1. aten ops per step (TorchDispatchMode) and Triton launches per step, for the bare step and for the whole
   ``sample_fused`` loop with a 0-op stub model (what the sampler itself adds per step).
   Without a GPU the Triton path is counted with a stub kernel object (launches are counted, not executed),
   so the aten count is exactly the launcher's host-side allocations.
2. On CUDA: GPU time per step (CUDA events) and host time per call, SD1.5 / SDXL latent sizes, fp16 / fp32.
Prints markdown tables; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fewstep.kernels.consistency_step as cs  # noqa: E402
from fewstep.kernels import sample_fused, triton_available  # noqa: E402

VIEW_OPS = {"aten.view", "aten.select", "aten.slice", "aten.unbind", "aten.expand", "aten.as_strided", "aten.detach", "aten._unsafe_view"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class StubLaunch:
    """Stands in for the compiled kernel on machines without a GPU: counts launches, runs nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1

        return run


def _coeffs(n, device):
    """A table in the kernel's layout (COEFF_FIELDS): the step's cost does not depend on the values."""
    sigmas = torch.linspace(14.6, 0.0, n + 1, dtype=torch.float64)
    table = torch.tensor([[0.2, 0.79, 0.97, 0.01, 0.99]] * n)
    table[-1, 2] = 0.0  # the step to sigma 0 adds no noise
    return table.to(device), sigmas.float().to(device)


def count_ops(device: str) -> list[tuple]:
    shape, n = (1, 4, 64, 64), 4
    coeffs, sigmas = _coeffs(n, device)
    x = torch.randn(shape, device=device)
    d, z = torch.randn_like(x), torch.randn_like(x)
    stub = None
    if device == "cpu":  # count the Triton launcher without running it
        stub = StubLaunch()
        cs._KERNELS[True] = stub
        os.environ["TRITON_INTERPRET"] = "1"
    rows = []

    def measure(label, fn, launches_of=None):
        fn()  # warm (compile)
        before = stub.launches if stub is not None else None
        with OpCounter() as c:
            fn()
        total = sum(c.ops.values())
        nonview = sum(v for k, v in c.ops.items() if k not in VIEW_OPS)
        launches = (stub.launches - before) if stub is not None and launches_of == "triton" else ("1" if launches_of == "triton" else "-")
        syncs = c.ops.get("aten._local_scalar_dense", 0)
        rows.append((label, total, nonview, launches, syncs, ", ".join(f"{k.split('.')[-1]}x{v}" for k, v in sorted(c.ops.items()))))

    can_triton = triton_available() and (device == "cuda" or stub is not None)
    measure("reference step", lambda: cs.consistency_step_reference(x, d, z, coeffs, 1))
    if can_triton:
        measure("fused step (triton)", lambda: cs.consistency_step(x, d, z, coeffs, 1), "triton")

    def loop_ops(backend):
        model = lambda x, s: x  # noqa: E731
        per = {}
        for steps in (2, 4):
            c2, s2 = _coeffs(steps, device)
            noise = torch.randn((steps - 1, *shape), device=device)  # the last step to sigma 0 reads none
            with OpCounter() as c:
                sample_fused(model, x, s2, c2, noise, disable=True, backend=backend)
            per[steps] = (sum(c.ops.values()), c.ops.get("aten._local_scalar_dense", 0))
        return (per[4][0] - per[2][0]) / 2, per[4][1]

    for backend in ["torch"] + (["triton"] if can_triton else []):
        ops, syncs = loop_ops(backend)
        rows.append((f"sample_fused loop / step ({backend}, stub model)", ops, "", "1" if backend == "triton" else "-", syncs, ""))
    if stub is not None:
        cs._KERNELS.pop(True, None)
    return rows


def time_cuda(iters: int) -> list[tuple]:
    rows = []
    for shape in [(1, 4, 64, 64), (2, 4, 64, 64), (1, 4, 128, 128), (2, 4, 128, 128)]:
        for dtype in (torch.float16, torch.float32):
            coeffs, _ = _coeffs(4, "cuda")
            x = torch.randn(shape, device="cuda", dtype=dtype)
            d, z = torch.randn_like(x), torch.randn_like(x)
            res = {}
            for name, fn in (("reference", cs.consistency_step_reference), ("fused", cs.consistency_step)):
                for _ in range(10):
                    fn(x, d, z, coeffs, 1)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn(x, d, z, coeffs, 1)
                end.record()
                host = (time.perf_counter() - t0) / iters * 1e6
                torch.cuda.synchronize()
                res[name] = (start.elapsed_time(end) / iters * 1e3, host)
            speed = res["reference"][0] / res["fused"][0]
            rows.append((str(tuple(shape)), str(dtype).split(".")[-1], f"{res['reference'][0]:.1f}", f"{res['fused'][0]:.1f}",
                         f"{res['reference'][1]:.1f}", f"{res['fused'][1]:.1f}", f"{speed:.2f}x"))
    return rows


def _table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton launches stubbed, counted not run)"
    print(f"## consistency step: ops per step on {name}; torch {torch.__version__}, triton available: {triton_available()}\n")
    _table(["what", "aten ops", "non-view", "triton launches", "host syncs", "ops"], count_ops(device))
    if device == "cuda" and triton_available():
        print(f"## GPU time per step (CUDA events, {args.iters} iters) and host time per call, {name}\n")
        _table(["latent", "dtype", "reference µs (GPU)", "fused µs (GPU)", "reference µs (host)", "fused µs (host)", "GPU speed-up"],
               time_cuda(args.iters))
    else:
        print("(no CUDA: timing skipped)")


if __name__ == "__main__":
    main()
