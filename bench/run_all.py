"""Run the fewstep benchmarks with sensible defaults for this machine (``make bench``).

    python -m bench.run_all [--quick] [--json-dir DIR] [--sdxl]

1. ``bench.bench_sampler_overhead``: per-step sampler overhead outside the UNet through the real host path,
   fewstep vs core ``lcm`` / ``euler`` (stub UNet; runs anywhere in well under a minute).
2. ``bench.bench_e2e_speed``: real-architecture stand-in UNet + VAE, stock ``lcm`` vs fewstep fused. With a CUDA GPU:
   512 and 1024 px, 4 steps, timings. Without one: ``--cpu-small`` (64 px, 2 steps, counts and image check only).

The micro-benchmark of the fused step alone is ``python -m bench.bench_step_kernels`` (not run here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    p.add_argument("--json-dir", help="write sampler_overhead.json and e2e_speed.json here")
    p.add_argument("--sdxl", action="store_true", help="e2e: also SDXL (CUDA only; 7 GB stand-in)")
    args = p.parse_args(argv)

    from bench import bench_e2e_speed, bench_sampler_overhead

    bench_sampler_overhead.import_host()
    info = bench_sampler_overhead.machine_info()
    cuda = torch.cuda.is_available()
    print("# fewstep benchmarks")
    print(f"date: {info['date']}")
    print(f"cpu: {info['cpu']} ({info['cpu_count']} logical cores)")
    print(f"gpu: {info['gpu']}")
    print(f"python {info['python']}, torch {info['torch']}, triton {info['triton']}, ComfyUI {info['comfyui']}")
    print()

    def json_arg(name):
        if not args.json_dir:
            return []
        os.makedirs(args.json_dir, exist_ok=True)
        return ["--json", os.path.join(args.json_dir, name)]

    t0 = time.perf_counter()
    bench_sampler_overhead.main(["--reps", "5" if args.quick else "15", *json_arg("sampler_overhead.json")])
    print(f"\n(sampler overhead: {time.perf_counter() - t0:.0f} s)\n")

    t1 = time.perf_counter()
    e2e = ["--reps", "3" if args.quick else "5"] if cuda else ["--cpu-small"]
    if args.sdxl and cuda:
        e2e.append("--sdxl")
    bench_e2e_speed.main([*e2e, *json_arg("e2e_speed.json")])
    print(f"\n(e2e: {time.perf_counter() - t1:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
