"""End-to-end few-step speed with the real-architecture UNets: stock ComfyUI ``lcm`` vs fewstep's fused sampler.

    python -m bench.bench_e2e_speed                  # CUDA: SD1.5 at 512 and 1024 px, 4 steps
    python -m bench.bench_e2e_speed --sdxl           # CUDA: also SDXL (7 GB stand-in checkpoint)
    python -m bench.bench_e2e_speed --cpu-small      # no GPU: SD1.5 at 64x64 px, 2 steps, counts only (< 2 min)

Models are the stand-in checkpoints (``tools/standins/``: the real SD1.5 / SDXL architectures with seeded
random weights) loaded with ``comfy.sd.load_checkpoint_guess_config``; sampling goes through the real
``comfy.sample.sample``; images through the real ``VAE.decode``. Batch 1, cfg 1, empty latent, same seed.

For each model and size, and for each of

* ``stock lcm``: core ``lcm`` sampler, ``sgm_uniform`` scheduler;
* ``fewstep fused``: ``fewstep_lcm`` / ``fewstep_lcm50``. On CUDA the pack picks its fused loop itself
  (``fused=auto``); without CUDA the fused loop is forced onto its torch backend so the same code path runs;
* ``fewstep unfused`` (reference for the image check): ``fewstep_lcm`` with the fused loop switched off;

it prints sampler kernels per step (non-view aten ops outside the UNet, inside the loop, plus Triton launches of
the fused step), scalar reads per step (``aten._local_scalar_dense``: host syncs on a GPU), and on CUDA: GPU ms per
step (CUDA events at each UNet call, so host bubbles are included), host ms per step, and end-to-end ms (sampling
plus VAE decode, synchronised), with ratios vs stock. It also reports max |diff| of the decoded images:
fused vs unfused fewstep (same math, same noise: should be ~0) and fused vs stock lcm (different timestep grid,
step noise and boundary-condition convention: expected to differ; reported for information).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from bench.bench_sampler_overhead import (  # noqa: E402
    MARK,
    SYNC_OPS,
    OpCounter,
    fmt_num,
    forced_fused,
    host_fused_available,
    import_host,
    machine_info,
    not_counted,
    ratio,
)

SEED = 20261125


class LaunchCounter:
    """Counts calls of the Triton launcher ``kernels.consistency_step.consistency_step`` (one launch each)."""

    def __init__(self):
        self.n = 0
        self._saved = None

    def __enter__(self):
        from fewstep.kernels import consistency_step as cs

        self._cs, self._saved = cs, cs.consistency_step

        def counted(*a, **k):
            self.n += 1
            return self._saved(*a, **k)

        cs.consistency_step = counted
        return self

    def __exit__(self, *exc):
        self._cs.consistency_step = self._saved


class CudaMarks:
    """CUDA events recorded at each UNet call (GPU-side step times, host bubbles included)."""

    def __init__(self):
        self.events = []
        self.on = False

    def hit(self):
        if self.on:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)


CMARK = CudaMarks()


def instrument_unet(patcher):
    """Make the UNet forward a counting boundary: marks each call, and its ops are not counted."""
    dm = patcher.model.diffusion_model
    orig = dm.forward

    def forward(*a, **k):
        MARK.hit()
        CMARK.hit()
        with not_counted():
            return orig(*a, **k)

    dm.forward = forward


@contextlib.contextmanager
def fused_off():
    from fewstep.kernels import loop

    saved = loop.use_fused
    loop.use_fused = lambda mode, x: False
    try:
        yield
    finally:
        loop.use_fused = saved


def load(kind: str):
    import comfy.sd

    from tools import standins

    root = standins.ensure((kind,))
    path = str(root / "checkpoints" / standins.checkpoint_name(kind))
    t0 = time.perf_counter()
    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=False,
                                                                 embedding_directory=None)
    print(f"  loaded {kind} stand-in in {time.perf_counter() - t0:.1f} s ({type(model.model).__name__})")
    instrument_unet(model)
    return model, vae


def conds(kind: str, px: int):
    g = torch.Generator().manual_seed(7)
    if kind == "sd15":
        return [[torch.randn(1, 77, 768, generator=g), {}]]
    extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": px, "height": px,
             "target_width": px, "target_height": px}
    return [[torch.randn(1, 77, 2048, generator=g), extra]]


VARIANTS = [
    # label, sampler, scheduler, context (what runs the fewstep loop)
    ("stock lcm", "lcm", "sgm_uniform", "plain"),
    ("fewstep fused", "fewstep_lcm", "fewstep_lcm50", "fused"),
    ("fewstep unfused", "fewstep_lcm", "fewstep_lcm50", "unfused"),
]


def _ctx(mode: str, cuda: bool):
    if mode == "fused" and not cuda:
        return forced_fused()
    if mode == "unfused":
        return fused_off()
    return contextlib.nullcontext()


def run_case(kind, model, vae, px, steps, reps, cuda):
    import comfy.sample

    pos = conds(kind, px)
    latent = torch.zeros(1, 4, px // 8, px // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SEED))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results, images = [], {}
    for label, sampler, scheduler, mode in VARIANTS:
        if mode == "fused" and not cuda and not host_fused_available():
            print(f"  {label}: fewstep.kernels.loop has no fused path; skipped")
            continue

        def sample():
            with _ctx(mode, cuda):
                return comfy.sample.sample(model, noise, steps, 1.0, sampler, scheduler, pos, pos, latent,
                                           disable_pbar=True, seed=SEED)

        def decode(s):
            return vae.decode(s)

        if cuda:  # warm-up (model load to the device, Triton compile, cudnn autotune); on a CPU the counted run is enough
            decode(sample())
            sync()

        # counts: in-loop ops between the first and the last UNet call
        with LaunchCounter() as lc, OpCounter() as c:
            MARK.reset(c)
            samples = sample()
        snaps, MARK.counter = MARK.snaps, None
        images[label] = decode(samples).detach().float().cpu()
        k = max(1, len(snaps) // steps)
        (a, av), (b, bv) = snaps[0], snaps[(steps - 1) * k]
        ops = {key: b[key] - a.get(key, 0) for key in b if b[key] - a.get(key, 0)}
        n = steps - 1
        total = sum(ops.values())
        row = dict(model=kind, px=px, steps=steps, label=label, sampler=sampler, scheduler=scheduler,
                   ops_per_step=total / n, nonview_per_step=(total - (bv - av)) / n,
                   triton_launches_per_step=lc.n / steps,
                   scalar_reads_per_step=ops.get("aten._local_scalar_dense", 0) / n,
                   syncs_per_step=sum(ops.get(s, 0) for s in SYNC_OPS) / n,
                   scalar_reads_whole_call=c.ops.get("aten._local_scalar_dense", 0), unet_calls_per_step=len(snaps) / steps)
        row["kernels_per_step"] = row["nonview_per_step"] + row["triton_launches_per_step"]

        if cuda:
            gpu_ms, host_ms, e2e_ms = [], [], []
            for _ in range(reps):
                sync()
                MARK.reset(None)
                CMARK.events, CMARK.on = [], True
                t0 = time.perf_counter()
                s = sample()
                decode(s)
                sync()
                t1 = time.perf_counter()
                CMARK.on = False
                ev, ts = CMARK.events, MARK.times
                gpu_ms.append(ev[0].elapsed_time(ev[(steps - 1) * k]) / (steps - 1))
                host_ms.append((ts[(steps - 1) * k] - ts[0]) * 1e3 / (steps - 1))
                e2e_ms.append((t1 - t0) * 1e3)
            row.update(gpu_ms_per_step=statistics.median(gpu_ms), host_ms_per_step=statistics.median(host_ms),
                       e2e_ms=statistics.median(e2e_ms), e2e_ms_all=e2e_ms)
        results.append(row)
        print(f"  {kind} {px}px {label:<16} kernels/step={fmt_num(row['kernels_per_step'])} "
              f"scalar reads/step={fmt_num(row['scalar_reads_per_step'])}"
              + (f" gpu ms/step={row['gpu_ms_per_step']:.2f} e2e ms={row['e2e_ms']:.1f}" if cuda else ""))
    diffs = {}
    if "fewstep fused" in images:
        for other in ("fewstep unfused", "stock lcm"):
            if other in images:
                diffs[f"fused vs {other}"] = float((images["fewstep fused"] - images[other]).abs().max())
    return results, diffs


def table(rows, cuda) -> str:
    head = ["model", "px", "steps", "sampler", "sampler kernels / step", "scalar reads (syncs) / step",
            "scalar reads, whole call"]
    if cuda:
        head += ["GPU ms / step", "host ms / step", "e2e ms (sample + VAE)", "e2e vs stock", "step vs stock"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {(r["model"], r["px"]): r for r in rows if r["label"] == "stock lcm"}
    for r in rows:
        b = base.get((r["model"], r["px"]))
        kern = fmt_num(r["nonview_per_step"]) + (f" + {fmt_num(r['triton_launches_per_step'])} Triton"
                                                 if r["triton_launches_per_step"] else "")
        cells = [r["model"], str(r["px"]), str(r["steps"]), f"{r['label']} ({r['sampler']}/{r['scheduler']})", kern,
                 fmt_num(r["scalar_reads_per_step"]), str(r["scalar_reads_whole_call"])]
        if cuda:
            cells += [f"{r['gpu_ms_per_step']:.2f}", f"{r['host_ms_per_step']:.2f}", f"{r['e2e_ms']:.1f}",
                      ratio(r["e2e_ms"], b["e2e_ms"] if b else None), ratio(r["gpu_ms_per_step"], b["gpu_ms_per_step"] if b else None)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdxl", action="store_true", help="also run SDXL (loads the 7 GB stand-in)")
    p.add_argument("--models", nargs="+", choices=["sd15", "sdxl"],
                   help="exactly these stand-ins (default: sd15, plus sdxl with --sdxl)")
    p.add_argument("--cpu-small", action="store_true", help="64x64 px, 2 steps: proves the script works on a CPU")
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes in px (default 512 1024; --cpu-small: 64)")
    p.add_argument("--steps", type=int, help="sampling steps (default 4; --cpu-small: 2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on CUDA (median reported)")
    p.add_argument("--json", help="write all numbers here")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    import_host()
    info = machine_info()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_small:
        print("no CUDA GPU and no --cpu-small: use --cpu-small on a CPU-only machine (full sizes would take hours)")
        return {}
    sizes = args.sizes or ([64] if args.cpu_small else [512, 1024])
    steps = args.steps or (2 if args.cpu_small else 4)
    kinds = args.models or (["sd15"] + (["sdxl"] if args.sdxl else []))
    print(f"# end-to-end: stock lcm vs fewstep fused, batch 1, cfg 1, {steps} steps, sizes {sizes}")
    print(f"machine: {info['cpu']} x{info['cpu_count']}, torch {info['torch']}, triton {info['triton']}, "
          f"ComfyUI {info['comfyui']}, GPU {info['gpu']}, {info['date']}")
    if not cuda:
        print("no CUDA GPU: skipping timings (op/sync counts and the image check still run; the fused loop runs on "
              "its torch backend, so its kernel count is that of the fallback, not of the one-launch Triton step)")
    rows, checks = [], []
    for kind in kinds:
        model, vae = load(kind)
        for px in sizes:
            r, d = run_case(kind, model, vae, px, steps, args.reps, cuda)
            rows += r
            checks.append(dict(model=kind, px=px, **d))
        del model, vae
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print()
    print(table(rows, cuda))
    print()
    print("| model | px | max abs diff, decoded image in [0, 1]: fused vs unfused fewstep | fused vs stock lcm (different grid and noise) |")
    print("|---|---|---|---|")
    for c in checks:
        print(f"| {c['model']} | {c['px']} | {c.get('fused vs fewstep unfused', float('nan')):.3g} "
              f"| {c.get('fused vs stock lcm', float('nan')):.3g} |")
    result = dict(machine=info, cuda=cuda, steps=steps, sizes=sizes, rows=rows, image_checks=checks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
