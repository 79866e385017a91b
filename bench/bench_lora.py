"""Benchmark: FewStep LoRA Fuse vs core chained LoraLoaderModelOnly, and randomized vs full SVD export.

    python bench/bench_lora.py [--base sd15|sdxl] [--svd-keys 4] [--rank 64]

Fuse: LCM-LoRA-shaped stand-in (full UNet, rank 64) + 2 style LoRAs into the stand-in checkpoint. Times include
patching the weights (``patch_model``), so both sides do the same work; peak RSS is sampled every 10 ms and given
as the increase over the base-model-loaded baseline. SVD: randomized vs exact SVD of the biggest merged deltas at
the same rank (errors shown, so "equal error" can be checked).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402


class Peak:
    """Peak RSS (bytes) while the block runs, sampled on a thread."""

    def __init__(self):
        self.proc = psutil.Process(os.getpid())

    def __enter__(self):
        gc.collect()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", choices=["sd15", "sdxl"], default="sdxl")
    ap.add_argument("--svd-keys", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args()

    from tools import hostenv, standins
    d = standins.ensure((args.base,))
    hostenv.import_host()
    import comfy.model_management  # noqa: F401
    import comfy.sd
    import folder_paths
    import nodes
    folder_paths.add_model_folder_path("loras", str(d / "loras"))
    from fewstep.lora import export as lx
    from fewstep.nodes import lora as L

    tag = "sd15" if args.base == "sd15" else "sdxl"
    accel = f"lcm-lora-{tag}-standin.safetensors"
    # Two kohya-format styles: core loads both fully, so both paths patch the same weights (core would silently
    # drop a PEFT file's attention keys and do less work).
    styles = [f"style-{tag}-kohya.safetensors", f"style-{tag}-kohya-ldm.safetensors"]
    proc = psutil.Process(os.getpid())
    # SDXL in fp32 plus the host's backup copy does not fit 24 GiB of RAM: keep the UNet weights in fp16 there
    # (the host computes in fp32 via manual cast; patching works on an fp32 copy of each weight either way).
    opts = {"dtype": torch.float16} if args.base == "sdxl" else {}
    model = comfy.sd.load_checkpoint_guess_config(str(d / "checkpoints" / standins.checkpoint_name(args.base)),
                                                  output_clip=False, output_vae=False, model_options=opts)[0]
    gc.collect()
    base_rss = proc.memory_info().rss
    print(f"base {args.base}: model loaded, RSS {base_rss / 2**30:.2f} GiB, torch threads {torch.get_num_threads()}")
    rows = []

    def run_fewstep():
        with Peak() as p:
            m, report, preset = L.fuse(model, accel, 1.0, [(styles[0], 0.8), (styles[1], 0.6)])
        with Peak() as q:
            m.patch_model()
        out = (p.seconds, p.peak - base_rss, p.seconds + q.seconds, max(p.peak, q.peak) - base_rss, len(m.patches))
        m.unpatch_model()
        del m
        gc.collect()
        return out

    def run_core():
        with Peak() as p:
            c = model
            for name, s in [(accel, 1.0), (styles[0], 0.8), (styles[1], 0.6)]:
                c = nodes.LoraLoaderModelOnly().load_lora_model_only(c, name, s)[0]
            t_load = time.perf_counter() - p.t0
            c.patch_model()
        out = (t_load, p.seconds, p.peak - base_rss, len(c.patches))
        c.unpatch_model()
        del c
        gc.collect()
        return out

    # Alternate three times and keep each path's best run, so neither gains from the other warming the page cache.
    fs, cs = [], []
    for _ in range(3):
        cs.append(run_core())
        fs.append(run_fewstep())
    f, c = min(fs, key=lambda r: r[2]), min(cs, key=lambda r: r[1])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"fuse+patch seconds, all runs: fewstep {[round(r[2], 2) for r in fs]}, core {[round(r[1], 2) for r in cs]}; "
          f"median ratio {med([r[1] for r in cs]) / med([r[2] for r in fs]):.2f}x")
    rows += [("fewstep fuse (plan only; deltas computed at patch)", f[0], f[1]),
             ("fewstep fuse + patch_model", f[2], f[3]),
             ("core LoraLoaderModelOnly x3 (load)", c[0], None),
             ("core LoraLoaderModelOnly x3 + patch_model", c[1], c[2])]
    n_core, n_ours = c[3], f[4]
    print(f"fewstep/core time ratio (fuse+patch): {c[1] / f[2]:.2f}x faster" if f[2] < c[1]
          else f"fewstep/core time ratio (fuse+patch): {f[2] / c[1]:.2f}x slower")

    print(f"\nFuse ({args.base} stand-in; LCM-shaped rank-64 full-UNet + 2 rank-8 attention styles; "
          f"keys patched: fewstep {n_ours}, core {n_core})")
    print(f"{'what':45s} {'seconds':>9s} {'peak RSS over base':>20s}")
    for what, s, mem in rows:
        print(f"{what:45s} {s:9.2f} {('-' if mem is None else f'{mem / 2**30:.2f} GiB'):>20s}")

    # SVD export on the biggest merged deltas.
    m, _, _ = L.fuse(model, accel, 1.0, [(styles[0], 0.8), (styles[1], 0.6)])
    sd = m.model.state_dict()
    big = sorted(m.patches, key=lambda k: -sd[k].numel())[: args.svd_keys]
    deltas = {k: m.patches[k][-1][1].compute(device=None) for k in big}
    print(f"\nSVD export at rank {args.rank} of {len(big)} biggest deltas: "
          + ", ".join(f"{k.replace('diffusion_model.', '')} {tuple(deltas[k].shape)}" for k in big))
    print(f"{'method':12s} {'seconds':>9s} {'overall rel. Frobenius error':>30s}")
    def timed(fn, rank):
        t = time.perf_counter()
        _, rep = fn(deltas, rank=rank, dtype=torch.float32)
        return time.perf_counter() - t, rep.overall_rel_error

    t_full, e_full = timed(lx.full_svd_export, args.rank)
    t_rand, e_rand = timed(lx.export_lora, args.rank)
    print(f"{'randomized':12s} {t_rand:9.2f} {e_rand:30.6f}   (rank {args.rank})")
    print(f"{'full':12s} {t_full:9.2f} {e_full:30.6f}   (rank {args.rank})")
    # Equal error: the smallest randomized rank whose error is no worse than the full SVD's at --rank.
    for rank in sorted({args.rank + d for d in (1, 2, 4, 8, 16, 32)}):
        t_r, e_r = timed(lx.export_lora, rank)
        if e_r <= e_full:
            print(f"{'randomized':12s} {t_r:9.2f} {e_r:30.6f}   (rank {rank}: equal error -> "
                  f"{t_full / t_r:.1f}x faster than full)")
            break
    else:
        print("randomized did not reach the full SVD's error within rank +32")


if __name__ == "__main__":
    main()
