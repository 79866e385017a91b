"""Benchmark: FewStep LoRA Fuse vs core chained LoraLoaderModelOnly, and randomized vs full SVD export.

    python bench/bench_lora.py [--base sd15|sdxl|wan] [--styles attn|transformer] [--style-rank 32] [--svd-keys 4]
                               [--rank 64] [--runs 3] [--device cpu|cuda] [--memory-only fewstep|core]
                               [--dtype bf16|fp16|fp8_e4m3fn] [--dim 1536] [--blocks 30]

DiT mode (``--base wan``): a Wan 2.1 T2V model at full width built by the host's own classes (1.3B: dim 1536, 30
blocks, FFN 8960, 12 heads; ``--dim 5120 --blocks 40`` is the 14B layout), its weights seeded in ``--dtype`` (fp8 as
UNETLoader's fp8 weight_dtype stores them; the host then rounds patched weights stochastically); an acceleration
LoRA shaped like lightx2v (rank 64 on every linear of every block, the text / time embeddings and the head, bias
diffs) and two style LoRAs core also loads fully (musubi-tuner rank 16 on the blocks' attention and FFN, Kijai-style
``diffusion_model.*`` rank 8 on the cross-attention), written into a temporary folder.

Fuse: LCM-LoRA-shaped stand-in (full UNet, rank 64) + 2 style LoRAs into the stand-in checkpoint. Times include
patching the weights (``patch_model``), so both sides do the same work; peak RSS is sampled every 10 ms and given
as the increase over the base-model-loaded baseline (freed heap is returned to the OS before each measurement, so
an earlier run's garbage does not count). SVD: randomized vs exact SVD of the biggest merged deltas at the same
rank (errors shown, so "equal error" can be checked).

Style LoRAs: ``attn`` uses the test stand-ins (rank 8, attention q/k/v/out only: the smallest common style LoRA);
``transformer`` writes two kohya-format LoRAs covering kohya's default targets -- every Linear / 1x1 conv inside
the Transformer2DModel blocks (attention, feed-forward, proj_in/out), as most SD1.5/SDXL style LoRAs are trained --
at ``--style-rank`` into a temporary folder.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import tempfile
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402


def trim() -> None:
    """Give freed heap back to the OS (glibc), so RSS measures live memory, not an earlier run's garbage."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def write_transformer_styles(kind: str, rank: int, folder: Path) -> list[str]:
    """Two kohya-format style LoRAs over kohya's default UNet targets (all Linear / 1x1 conv in Transformer2DModel)."""
    from safetensors.torch import save_file
    from tools import standins
    targets = {d: v for d, v in standins.unet_lora_targets(kind, "full").items() if ".attentions." in d}
    names = []
    for i, (fmt, alpha) in enumerate([("kohya_diffusers", rank / 2), ("kohya_ldm", float(rank))]):
        sd = {}
        for dmod, (lmod, shape) in targets.items():
            down, up = standins._factors(f"bench-style{i}:{rank}:{dmod}", shape, rank, alpha / rank)
            k = "lora_unet_" + (dmod if fmt == "kohya_diffusers" else lmod).replace(".", "_")
            sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = down.half(), up.half()
            sd[k + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
        name = f"bench-style{i}-{kind}-transformer-r{rank}.safetensors"
        save_file(sd, str(folder / name), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
        names.append(name)
    return names


DIT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn}


def dit_model(dim: int, blocks: int, dtype: torch.dtype):
    """A Wan 2.1 T2V model at ``dim`` / ``blocks`` from the host's own classes, weights N(0, 1/fan_in) in ``dtype``
    (fp8: stored fp8, computed in bf16, as UNETLoader's fp8 weight_dtype loads it)."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = sm.WAN21_T2V({**sm.WAN21_T2V.unet_config, "dim": dim, "ffn_dim": {1536: 8960, 5120: 13824}.get(dim, 4 * dim),
                        "num_heads": dim // 128, "num_layers": blocks, "text_dim": 4096, "freq_dim": 256,
                        "in_dim": 16, "out_dim": 16})
    fp8 = dtype == torch.float8_e4m3fn
    cfg.set_inference_dtype(dtype, torch.bfloat16 if fp8 else None)
    model = cfg.get_model({})
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim < 2 or name.endswith("bias"):
                p.copy_(torch.zeros(p.shape) if name.endswith("bias") else torch.ones(p.shape))
                continue
            fan_in = p[0].numel() if p.ndim > 1 else 1
            for i in range(0, p.shape[0], 1024):  # in slices: no full-size fp32 temporary
                rows = p[i:i + 1024]
                rows.copy_((torch.randn(rows.shape, generator=g) / fan_in ** 0.5).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def write_dit_loras(model, folder: Path) -> tuple[str, list[str]]:
    """A lightx2v-shaped acceleration LoRA and two style LoRAs (module doc) for ``model``; their file names."""
    import re
    from safetensors.torch import save_file
    shapes = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in model.model.state_dict().items()
              if k.startswith("diffusion_model.")}
    g = torch.Generator().manual_seed(1)

    def factors(shape, rank):
        return ((torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5).half(),
                (torch.randn(shape[0], rank, generator=g) * 0.01).half())

    linears = [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    block = [m for m in linears if re.match(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]$|blocks\.\d+\.ffn\.[02]$", m)]
    outside = [m for m in linears if re.match(r"(text_embedding|time_embedding)\.[02]$|time_projection\.1$|"
                                              r"head\.head$", m)]
    files = {"bench-wan-lightx2v-shaped.safetensors": {}, "bench-wan-style-musubi.safetensors": {},
             "bench-wan-style-kijai.safetensors": {}}
    acc, musubi, kijai = files.values()
    for m in block + outside:
        acc[f"diffusion_model.{m}.lora_down.weight"], acc[f"diffusion_model.{m}.lora_up.weight"] = factors(
            shapes[m + ".weight"], 64)
        if m + ".bias" in shapes:
            acc[f"diffusion_model.{m}.diff_b"] = (torch.randn(shapes[m + ".bias"], generator=g) * 1e-3).half()
    for m in block:
        k = "lora_unet_" + m.replace(".", "_")
        musubi[k + ".lora_down.weight"], musubi[k + ".lora_up.weight"] = factors(shapes[m + ".weight"], 16)
        musubi[k + ".alpha"] = torch.tensor(8.0)
        if ".cross_attn." in m:
            kijai[f"diffusion_model.{m}.lora_down.weight"], kijai[f"diffusion_model.{m}.lora_up.weight"] = factors(
                shapes[m + ".weight"], 8)
    for name, sd in files.items():
        save_file(sd, str(folder / name))
    names = list(files)
    return names[0], names[1:]


class Peak:
    """Peak RSS (bytes) while the block runs, sampled on a thread."""

    def __init__(self):
        self.proc = psutil.Process(os.getpid())

    def __enter__(self):
        gc.collect()
        trim()
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
    ap.add_argument("--base", choices=["sd15", "sdxl", "wan"], default="sdxl")
    ap.add_argument("--dtype", choices=list(DIT_DTYPES), default="bf16", help="--base wan: weight storage dtype")
    ap.add_argument("--dim", type=int, default=1536, help="--base wan: model width (1536 = 1.3B, 5120 = 14B)")
    ap.add_argument("--blocks", type=int, default=30, help="--base wan: number of blocks (30 = 1.3B, 40 = 14B)")
    ap.add_argument("--svd-keys", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64, help="SVD export rank")
    ap.add_argument("--styles", choices=["attn", "transformer"], default="attn")
    ap.add_argument("--style-rank", type=int, default=32, help="rank of the --styles transformer LoRAs")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per path (best and median reported)")
    ap.add_argument("--memory-only", choices=["fewstep", "core"], default=None,
                    help="run just this path once in this (fresh) process and print its peak RSS over the loaded "
                         "model; run it once per path for a memory comparison free of the other path's heap state")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where patch_model() puts and patches the weights (cuda: as ComfyUI does on a GPU; the "
                         "GPU peak memory is reported too)")
    args = ap.parse_args()

    from tools import hostenv, standins
    hostenv.import_host()
    import comfy.model_management  # noqa: F401
    import comfy.sd
    import folder_paths
    import nodes
    from fewstep.lora import export as lx
    from fewstep.nodes import lora as L

    proc = psutil.Process(os.getpid())
    if args.base == "wan":
        tmp = Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
        model = dit_model(args.dim, args.blocks, DIT_DTYPES[args.dtype])
        accel, styles = write_dit_loras(model, tmp)
        folder_paths.add_model_folder_path("loras", str(tmp))
    else:
        d = standins.ensure((args.base,))
        folder_paths.add_model_folder_path("loras", str(d / "loras"))
        tag = "sd15" if args.base == "sd15" else "sdxl"
        accel = f"lcm-lora-{tag}-standin.safetensors"
        # Two kohya-format styles: core loads both fully, so both paths patch the same weights (core would silently
        # drop a PEFT file's attention keys and do less work).
        styles = [f"style-{tag}-kohya.safetensors", f"style-{tag}-kohya-ldm.safetensors"]
        if args.styles == "transformer":
            tmp = Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
            styles = write_transformer_styles(args.base, args.style_rank, tmp)
            folder_paths.add_model_folder_path("loras", str(tmp))
        # SDXL in fp32 plus the host's backup copy does not fit 24 GiB of RAM: keep the UNet weights in fp16 there
        # (the host computes in fp32 via manual cast; patching works on an fp32 copy of each weight either way).
        opts = {"dtype": torch.float16} if args.base == "sdxl" else {}
        model = comfy.sd.load_checkpoint_guess_config(str(d / "checkpoints" / standins.checkpoint_name(args.base)),
                                                      output_clip=False, output_vae=False, model_options=opts)[0]
    gc.collect()
    trim()
    base_rss = proc.memory_info().rss
    print(f"base {args.base}: model loaded, RSS {base_rss / 2**30:.2f} GiB, torch threads {torch.get_num_threads()}")
    rows = []
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dev = torch.device(args.device) if cuda else None
    gpu_peaks = {"fewstep": [], "core": []}
    if cuda:  # CUDA context and cuBLAS initialised before anything is timed
        (torch.ones(64, 64, device=dev) @ torch.ones(64, 64, device=dev)).sum().item()

    def patch(m, who):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        m.patch_model(device_to=dev)
        if cuda:
            torch.cuda.synchronize()
            gpu_peaks[who].append(torch.cuda.max_memory_allocated())

    def unpatch(m):
        m.unpatch_model(device_to=m.offload_device if cuda else None)
        if cuda:
            torch.cuda.empty_cache()

    def run_fewstep():
        with Peak() as p:
            m, report, preset = L.fuse(model, accel, 1.0, [(styles[0], 0.8), (styles[1], 0.6)])
        with Peak() as q:
            patch(m, "fewstep")
        out = (p.seconds, p.peak - base_rss, p.seconds + q.seconds, max(p.peak, q.peak) - base_rss, len(m.patches))
        unpatch(m)
        del m
        gc.collect()
        return out

    def run_core():
        with Peak() as p:
            c = model
            for name, s in [(accel, 1.0), (styles[0], 0.8), (styles[1], 0.6)]:
                c = nodes.LoraLoaderModelOnly().load_lora_model_only(c, name, s)[0]
            t_load = time.perf_counter() - p.t0
            patch(c, "core")
        out = (t_load, p.seconds, p.peak - base_rss, len(c.patches))
        unpatch(c)
        del c
        gc.collect()
        return out

    if args.memory_only:
        r = run_fewstep() if args.memory_only == "fewstep" else run_core()
        secs, peak = (r[2], r[3]) if args.memory_only == "fewstep" else (r[1], r[2])
        print(f"memory-only {args.memory_only}: fuse+patch {secs:.2f} s, peak RSS over the loaded model "
              f"{peak / 2**30:.3f} GiB")
        return
    # Alternate three times and keep each path's best run, so neither gains from the other warming the page cache.
    fs, cs = [], []
    for _ in range(args.runs):
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
    if cuda:
        gf, gc_ = max(gpu_peaks["fewstep"]), max(gpu_peaks["core"])
        print(f"GPU ({torch.cuda.get_device_name(0)}) peak memory while patching: fewstep {gf / 2**30:.2f} GiB, "
              f"core {gc_ / 2**30:.2f} GiB, difference {(gf - gc_) / 2**30:+.2f} GiB")
    print(f"fewstep/core time ratio (fuse+patch): {c[1] / f[2]:.2f}x faster" if f[2] < c[1]
          else f"fewstep/core time ratio (fuse+patch): {f[2] / c[1]:.2f}x slower")

    if args.base == "wan":
        desc = (f"Wan 2.1 T2V dim {args.dim}, {args.blocks} blocks, {args.dtype}; lightx2v-shaped rank 64 on every "
                f"linear + musubi rank-16 and Kijai rank-8 styles")
    else:
        style_desc = ("2 rank-8 attention styles" if args.styles == "attn" else
                      f"2 rank-{args.style_rank} transformer-block styles (kohya default targets)")
        desc = f"{args.base} stand-in; LCM-shaped rank-64 full-UNet + {style_desc}"
    print(f"\nFuse ({desc}; keys patched: fewstep {n_ours}, core {n_core})")
    print(f"{'what':45s} {'seconds':>9s} {'peak RSS over base':>20s}")
    for what, s, mem in rows:
        print(f"{what:45s} {s:9.2f} {('-' if mem is None else f'{mem / 2**30:.2f} GiB'):>20s}")

    # SVD export on the biggest merged deltas.
    if args.svd_keys <= 0:
        return
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
