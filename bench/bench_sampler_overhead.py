"""Per-step sampler overhead outside the UNet: fewstep vs core ComfyUI ``lcm`` and ``euler`` in the same run.

    python -m bench.bench_sampler_overhead [--reps 15] [--cfg 1.0 2.0] [--dtype fp16] [--json out.json]

What it measures (CPU is fine; no GPU needed):

1. **Host path.** A real ComfyUI ``BaseModel`` (SD1.5 config, ``disable_unet_model_creation``) whose
   ``diffusion_model`` is a 1-op stub (``zeros_like``, eps = 0, so the model is the identity denoiser), wrapped in a
   real ``ModelPatcher`` and sampled through the real ``comfy.sample.sample`` (KSampler -> CFGGuider ->
   ``calc_cond_batch`` -> ``apply_model``), latents 1x4x64x64, conds in the host format ``[[tensor[1,77,768], {}]]``.
   For each (sampler, scheduler, cfg), at 4 and at 8 steps:

   * aten ops (a ``TorchDispatchMode`` counts every op *outside* the stub), non-view ops (~ kernel launches on a GPU),
     and ``aten._local_scalar_dense`` calls (``.item()`` / ``bool()`` / ``float()`` of a tensor: a host<->device
     sync when the tensor lives on a GPU, as ComfyUI's ``sigmas`` do);
   * per step = (count at 8 steps - count at 4 steps) / 4, which removes everything outside the loop;
   * host microseconds per step = median over ``--reps`` paired runs of (t8 - t4) / 4 (wall time, no counting mode).

2. **Sampler math alone** (no host): the named samplers ``samplers.lcm.sample_lcm`` / ``samplers.tcd.sample_tcd``
   on their unfused loop, ``kernels.loop.sample_fused`` (torch fallback backend, the same math as the one-launch
   Triton kernel; see ``bench/bench_step_kernels.py`` for Triton launch counts) and core ``sample_lcm`` /
   ``sample_euler``, each with a 0-op stub denoiser.

Prints markdown tables with ratios vs core ``lcm``; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SEED = 1234
LATENT = (1, 4, 64, 64)
#: ops that dispatch as tensors of a device but are really host-side reads or data-dependent shapes (syncs on a GPU)
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.masked_select", "aten._unique2")
#: view-like ops that are not flagged ``is_view`` in their schema
EXTRA_VIEWS = {"aten.detach", "aten.alias", "aten.lift_fresh", "aten._unsafe_view"}

# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------
_PAUSE = [0]


@contextlib.contextmanager
def not_counted():
    """Ops run inside this block (the stub UNet) are not counted."""
    _PAUSE[0] += 1
    try:
        yield
    finally:
        _PAUSE[0] -= 1


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _PAUSE[0]:
            name = str(func.overloadpacket)
            self.ops[name] += 1
            if getattr(func, "is_view", False) or name in EXTRA_VIEWS:
                self.views += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        total = sum(self.ops.values())
        return dict(total=total, nonview=total - self.views, scalar_reads=self.ops.get("aten._local_scalar_dense", 0),
                    syncs=sum(self.ops.get(k, 0) for k in SYNC_OPS), ops=dict(self.ops))


def count(fn) -> dict:
    with OpCounter() as c:
        fn()
    return c.summary()


class Markers:
    """Timestamps (and, under an OpCounter, op-count snapshots) taken at every stub-UNet call, so the per-step cost
    *inside* the sampling loop is (last - first) / (steps - 1), free of everything before and after the loop
    (schedule, noise, model load, output copies)."""

    def __init__(self):
        self.counter: OpCounter | None = None
        self.times: list[float] = []
        self.snaps: list[tuple[Counter, int]] = []

    def reset(self, counter: OpCounter | None = None):
        self.counter, self.times, self.snaps = counter, [], []

    def hit(self):
        self.times.append(time.perf_counter())
        if self.counter is not None:
            self.snaps.append((Counter(self.counter.ops), self.counter.views))


MARK = Markers()


def loop_counts(fn, steps: int) -> tuple[dict, dict, int]:
    """(per-step counts inside the loop, whole-call counts, UNet calls per step) for one run of ``fn``."""
    with OpCounter() as c:
        MARK.reset(c)
        fn()
    snaps, MARK.counter = MARK.snaps, None
    calls = len(snaps)
    k = max(1, calls // steps)
    (a_ops, a_views), (b_ops, b_views) = snaps[0], snaps[(steps - 1) * k]
    ops = Counter(b_ops)
    ops.subtract(a_ops)
    n = steps - 1
    total = sum(ops.values())
    per = dict(total=total / n, nonview=(total - (b_views - a_views)) / n,
               scalar_reads=ops.get("aten._local_scalar_dense", 0) / n, syncs=sum(ops.get(x, 0) for x in SYNC_OPS) / n,
               ops={key: v / n for key, v in sorted(ops.items()) if v})
    return per, c.summary(), calls / steps


def loop_time_us(fn, steps: int) -> tuple[float, float]:
    """(host µs per step inside the loop, whole-call ms) for one run of ``fn``, no counting mode."""
    MARK.reset(None)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    k = max(1, len(MARK.times) // steps)
    return (MARK.times[(steps - 1) * k] - MARK.times[0]) / (steps - 1) * 1e6, (t1 - t0) * 1e3


def measure(make, reps: int, lo: int = 4, hi: int = 8) -> dict:
    """Counts and timings for ``make(steps) -> fn`` at ``lo`` and ``hi`` steps."""
    f_lo, f_hi = make(lo), make(hi)
    f_lo(), f_hi()  # warm-up (imports, first-call caches)
    loop_lo, call_lo, k_lo = loop_counts(f_lo, lo)
    loop_hi, call_hi, _ = loop_counts(f_hi, hi)
    if loop_lo["total"] != loop_hi["total"]:
        print(f"  note: in-loop ops/step differ between {lo} and {hi} steps: {loop_lo['total']} vs {loop_hi['total']}")
    loop_us, diff_us, call_ms = [], [], []
    for _ in range(reps):
        _, ms_lo = loop_time_us(f_lo, lo)
        us_hi, ms_hi = loop_time_us(f_hi, hi)
        loop_us.append(us_hi)
        diff_us.append((ms_hi - ms_lo) * 1e3 / (hi - lo))
        call_ms.append(ms_lo)
    return dict(
        loop=loop_hi, loop_lo_total=loop_lo["total"], unet_calls_per_step=k_lo,
        with_schedule=per_step(call_lo, call_hi, hi - lo),
        call_scalar_reads_lo=call_lo["scalar_reads"], call_syncs_lo=call_lo["syncs"], call_total_lo=call_lo["total"],
        loop_us=statistics.median(loop_us), loop_us_all=loop_us,
        diff_us=statistics.median(diff_us), diff_us_all=diff_us, call_ms_lo=statistics.median(call_ms),
    )


def per_step(c_lo: dict, c_hi: dict, d_steps: int) -> dict:
    out = {k: (c_hi[k] - c_lo[k]) / d_steps for k in ("total", "nonview", "scalar_reads", "syncs")}
    ops = Counter(c_hi["ops"])
    ops.subtract(c_lo["ops"])
    out["ops"] = {k: v / d_steps for k, v in sorted(ops.items()) if v}
    return out


def fmt_num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.2f}"
    return str(int(v)) if isinstance(v, (int, float)) else str(v)


def ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


# ----------------------------------------------------------------------------------------------------------------
# Host set-up
# ----------------------------------------------------------------------------------------------------------------
def import_host():
    from tools import hostenv

    hostenv.import_host()
    import comfy.model_management  # noqa: F401  (CPU args are set before this import)
    from fewstep.nodes import registry

    registry.register()
    return hostenv


class StubUNet(torch.nn.Module):
    """Stands in for ``UNetModel``: one op (``zeros_like``, i.e. eps = 0), not counted."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.calls = 0

    def forward(self, x, timesteps=None, context=None, **kwargs):
        self.calls += 1
        MARK.hit()
        with not_counted():
            return torch.zeros_like(x)


def build_stub_patcher(kind: str = "sd15", dtype: torch.dtype = torch.float16):
    """Real ComfyUI BaseModel for the SD1.5 (or SDXL) config with a stub diffusion_model, in a real ModelPatcher."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm

    from tools.standins import UNET_CONFIGS

    cfg = dict(UNET_CONFIGS[kind])
    cfg["disable_unet_model_creation"] = True
    if kind == "sd15":
        mc = sm.SD15(cfg)
        model = comfy.model_base.BaseModel(mc, device=torch.device("cpu"))
    else:
        mc = sm.SDXL(cfg)
        model = comfy.model_base.SDXL(mc, device=torch.device("cpu"))
    model.diffusion_model = StubUNet(dtype)
    dev = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
    return patcher


def sd15_conds(device="cpu"):
    g = torch.Generator().manual_seed(7)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    return pos, neg


@contextlib.contextmanager
def forced_fused():
    """Route fewstep's host sampler through its fused loop on the CPU (torch backend): same loop as on a GPU,
    with the step math done by the torch fallback instead of the Triton kernel."""
    from fewstep.kernels import loop

    saved = loop.use_fused
    loop.use_fused = lambda mode, x: mode != "off"
    try:
        yield
    finally:
        loop.use_fused = saved


def host_fused_available() -> bool:
    from fewstep.kernels import loop

    return hasattr(loop, "sample_fused") and hasattr(loop, "use_fused")


# (label, sampler, scheduler, forced fused loop)
HOST_CASES = [
    ("core euler", "euler", "simple", False),
    ("core euler", "euler", "sgm_uniform", False),
    ("core lcm", "lcm", "simple", False),
    ("core lcm", "lcm", "sgm_uniform", False),
    ("fewstep_lcm", "fewstep_lcm", "fewstep_lcm50", False),
    ("fewstep_tcd", "fewstep_tcd", "fewstep_lcm50", False),
    ("fewstep_lcm, fused loop (torch backend)", "fewstep_lcm", "fewstep_lcm50", True),
    ("fewstep_tcd, fused loop (torch backend)", "fewstep_tcd", "fewstep_lcm50", True),
]
BASELINE = ("lcm", "sgm_uniform")


def run_host_path(reps: int, cfgs, dtype: torch.dtype, lo: int = 4, hi: int = 8, log=print) -> list[dict]:
    import comfy.sample

    patcher = build_stub_patcher("sd15", dtype)
    pos, neg = sd15_conds()
    latent = torch.zeros(LATENT)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(SEED))
    fused_ok = host_fused_available()
    rows = []
    for cfg in cfgs:
        for label, sampler, scheduler, fused in HOST_CASES:
            if fused and not fused_ok:
                continue
            ctx = forced_fused if fused else contextlib.nullcontext

            def make(steps, cfg=cfg, sampler=sampler, scheduler=scheduler, ctx=ctx):
                def run():
                    with ctx():
                        return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                                                   disable_pbar=True, seed=SEED)
                return run

            row = dict(label=label, sampler=sampler, scheduler=scheduler, cfg=cfg, fused_loop=fused, **measure(make, reps, lo, hi))
            rows.append(row)
            log(f"  [host] cfg={cfg:g} {label:<40} {scheduler:<13} loop ops/step={fmt_num(row['loop']['total']):>5} "
                f"non-view={fmt_num(row['loop']['nonview']):>5} scalar reads/step={fmt_num(row['loop']['scalar_reads'])} "
                f"µs/step={row['loop_us']:.0f} (t8-t4)/4={row['diff_us']:.0f}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Sampler math alone
# ----------------------------------------------------------------------------------------------------------------
class StubDenoiser:
    """k-diffusion denoiser with 0 counted ops (returns x), exposing ``inner_model.inner_model.model_sampling``."""

    def __init__(self, model_sampling):
        inner = type("Inner", (), {})()
        inner.inner_model = type("Inner2", (), {})()
        inner.inner_model.model_sampling = model_sampling
        self.inner_model = inner

    def __call__(self, x, sigma, **kwargs):
        MARK.hit()
        return x


def _sigmas(ms, steps, scheduler):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(ms, scheduler, steps).to(torch.float32)


def run_math(reps: int, lo: int = 4, hi: int = 8, log=print) -> list[dict]:
    import comfy.k_diffusion.sampling as kd

    from fewstep.kernels.consistency_step import coefficient_table
    from fewstep.kernels.loop import sample_fused
    from fewstep.samplers import SAMPLERS
    from fewstep.samplers.parametrisation import parametrisation
    from fewstep.samplers.step import Step, step_coefficients

    patcher = build_stub_patcher("sd15", torch.float32)
    ms = patcher.model.model_sampling
    den = StubDenoiser(ms)
    x0 = torch.randn(LATENT, generator=torch.Generator().manual_seed(SEED))
    steps_of = {"lcm": Step(1.0, True, True), "tcd": Step(0.3)}

    def fused_inputs(steps, name):
        sig = _sigmas(ms, steps, "fewstep_lcm50")
        coeffs = coefficient_table(step_coefficients(sig, parametrisation(ms), steps_of[name]), "cpu")
        noise = torch.randn((steps - 1, *LATENT), generator=torch.Generator().manual_seed(SEED))  # last: none
        return sig, coeffs, noise

    def make_named(name):
        def make(steps):
            sig = _sigmas(ms, steps, "fewstep_lcm50")
            return lambda: SAMPLERS[name](den, x0, sig, {"seed": SEED}, None, True, fused="off")
        return make

    def make_fused(name):
        def make(steps):
            sig, coeffs, noise = fused_inputs(steps, name)
            return lambda: sample_fused(den, x0, sig, coeffs, noise, None, None, True, backend="torch")
        return make

    def make_core(fn, extra):
        def make(steps):
            sig = _sigmas(ms, steps, "sgm_uniform")
            return lambda: fn(den, x0, sig, dict(extra), None, True)
        return make

    cases = []
    for name in ("lcm", "tcd"):
        cases.append((f"fewstep sample_{name} (unfused loop, CPU step noise)", make_named(name)))
        cases.append((f"fewstep sample_fused ({name}, torch backend, pre-drawn noise)", make_fused(name)))
    cases.append(("core sample_lcm (sgm_uniform)", make_core(kd.sample_lcm, {"seed": SEED})))
    cases.append(("core sample_euler (sgm_uniform)", make_core(kd.sample_euler, {})))

    rows = []
    for label, make in cases:
        row = dict(label=label, **measure(make, reps, lo, hi))
        rows.append(row)
        log(f"  [math] {label:<60} loop ops/step={fmt_num(row['loop']['total']):>5} "
            f"scalar reads/step={fmt_num(row['loop']['scalar_reads'])} µs/step={row['loop_us']:.0f}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def host_table(rows: list[dict]) -> str:
    base = {r["cfg"]: r for r in rows if (r["sampler"], r["scheduler"]) == BASELINE and not r["fused_loop"]}
    out = ["| sampler | scheduler | cfg | aten ops / step | non-view / step | scalar reads / step "
           "| ops / step incl. schedule ((8-4)/4) | scalar reads / step incl. schedule | scalar reads, whole 4-step call "
           "| host µs / step (loop) | host µs / step ((t8-t4)/4) | non-view vs core lcm | µs (loop) vs core lcm |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lp, ws, b = r["loop"], r["with_schedule"], base.get(r["cfg"])
        out.append(f"| {r['label']} | {r['scheduler']} | {r['cfg']:g} | {fmt_num(lp['total'])} | {fmt_num(lp['nonview'])} "
                   f"| {fmt_num(lp['scalar_reads'])} | {fmt_num(ws['total'])} | {fmt_num(ws['scalar_reads'])} "
                   f"| {r['call_scalar_reads_lo']} | {r['loop_us']:.0f} | {r['diff_us']:.0f} "
                   f"| {ratio(lp['nonview'], b['loop']['nonview'] if b else None)} "
                   f"| {ratio(r['loop_us'], b['loop_us'] if b else None)} |")
    return "\n".join(out)


def math_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["label"].startswith("core sample_lcm")), None)
    out = ["| sampler loop (stub denoiser, no host) | aten ops / step | non-view / step | scalar reads / step "
           "| scalar reads, whole 4-step call | host µs / step (loop) | non-view vs core lcm | per-step ops |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lp = r["loop"]
        ops = ", ".join(f"{k.split('.', 1)[-1]}×{fmt_num(v)}" for k, v in lp["ops"].items())
        out.append(f"| {r['label']} | {fmt_num(lp['total'])} | {fmt_num(lp['nonview'])} | {fmt_num(lp['scalar_reads'])} "
                   f"| {r['call_scalar_reads_lo']} | {r['loop_us']:.0f} "
                   f"| {ratio(lp['nonview'], base['loop']['nonview'] if base else None)} | {ops} |")
    return "\n".join(out)


def op_breakdown(rows: list[dict], cfg: float) -> str:
    """Per-step (in-loop) op names where core lcm and the fewstep host paths differ."""
    pick = {r["label"]: r for r in rows if r["cfg"] == cfg and r["scheduler"] in ("sgm_uniform", "fewstep_lcm50")}
    keys = [k for k in ("core lcm", "fewstep_lcm", "fewstep_lcm, fused loop (torch backend)") if k in pick]
    if not keys:
        return ""
    names = sorted(set().union(*(pick[k]["loop"]["ops"] for k in keys)))
    out = [f"| in-loop aten op / step where they differ (cfg {cfg:g}) | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for n in names:
        vals = [pick[k]["loop"]["ops"].get(n, 0) for k in keys]
        if len(set(vals)) > 1:
            out.append(f"| {n} | " + " | ".join(fmt_num(v) for v in vals) + " |")
    return "\n".join(out)


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not importable"
    try:
        from tools import hostenv

        host_v = hostenv.host_version()
    except Exception:
        host_v = "unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=cpu, cpu_count=os.cpu_count(),
                python=platform.python_version(), torch=torch.__version__, triton=triton_v, comfyui=host_v, gpu=gpu,
                torch_threads=torch.get_num_threads())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="paired (4-step, 8-step) timing repetitions; median reported")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16",
                   help="stub UNet dtype (fp16 = what the host casts to on a GPU)")
    p.add_argument("--skip-math", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: host overhead without OpenMP contention; 0: leave as is)")
    p.add_argument("--json", help="write all numbers here")
    args = p.parse_args(argv)

    threads_before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import_host()
    info = machine_info()
    print(f"# sampler overhead outside the UNet (identity stub UNet, latents {'x'.join(map(str, LATENT))}, stub dtype {args.dtype})")
    print("per step = inside the loop, between the first and the last UNet call of an 8-step run; "
          "'incl. schedule' = (8-step call - 4-step call) / 4")
    print(f"machine: {info['cpu']} x{info['cpu_count']}, torch {info['torch']}, triton {info['triton']}, "
          f"ComfyUI {info['comfyui']}, GPU {info['gpu']}, torch threads {info['torch_threads']}, {info['date']}")
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    host = run_host_path(args.reps, args.cfg, dtype)
    math = [] if args.skip_math else run_math(args.reps)
    print()
    print("## Host path: comfy.sample.sample with a stub UNet (tensors on the CPU; scalar reads are syncs on a GPU)\n")
    print(host_table(host))
    if not host_fused_available():
        print("\n(fewstep.kernels.loop has no fused path: fused-loop rows skipped)")
    print()
    print(op_breakdown(host, args.cfg[0]))
    if math:
        print("\n## Sampler math alone (stub denoiser returning x, no host plumbing)\n")
        print(math_table(math))
    result = dict(machine=info, latent=LATENT, stub_dtype=args.dtype, reps=args.reps, host_path=host, sampler_math=math)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    torch.set_num_threads(threads_before)
    return result


if __name__ == "__main__":
    main()
