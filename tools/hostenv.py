"""The real ComfyUI host used by tests, the demo, `make serve` and the benchmarks.

* ``host_dir()``: ``$COMFYUI_DIR`` when set, else the copy made by ``tools/setup_env.py``.
* ``import_host()``: makes the host's ``comfy`` package importable in this process (tests/host, stand-in
  generation, benchmarks) with CPU-safe arguments, and the pack importable as ``fewstep`` (``tools.packroot``).
* ``Server``: starts ``main.py`` on a free (or given) 127.0.0.1 port with the stand-in model folder,
  submits API-format prompts to ``/prompt``, polls ``/history`` and stops the process.  With
  ``test_nodes=True`` it also loads the tests-only custom nodes of ``tests/custom_nodes`` (the text-encoder
  stand-in ``FewStepTestConditioning``), for that server only: the host's own custom_nodes folder is untouched.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_NODES = REPO / "tests" / "custom_nodes"
# Stand-in cache subfolders (tools/standins writes them); each feeds the host model folder of the same name.
STANDIN_FOLDERS = ("checkpoints", "loras", "diffusion_models", "vae")


class HostError(RuntimeError):
    """A set-up problem the user must fix (bad COMFYUI_DIR, port in use, missing checkpoint)."""


def host_dir() -> Path:
    env = os.environ.get("COMFYUI_DIR")
    path = Path(env).expanduser().resolve() if env else REPO / ".cache" / "host" / "ComfyUI"
    if not ((path / "main.py").is_file() and (path / "comfy").is_dir()):
        if env:
            raise HostError(f"COMFYUI_DIR={env} is not a ComfyUI install (no main.py and comfy/ inside)")
        raise HostError(f"no host at {path}; run `make setup` (or `python3 tools/setup_env.py`) first")
    return path


def host_version() -> str:
    try:
        text = (host_dir() / "comfyui_version.py").read_text()
        return text.split("__version__", 1)[1].split('"')[1]
    except (OSError, IndexError, HostError):
        return "unknown"


_imported = False


def import_host() -> None:
    """Import the host's `comfy` package in-process (idempotent)."""
    global _imported
    if _imported:
        return
    host = str(host_dir())
    if host not in sys.path:
        sys.path.insert(0, host)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    import torch
    if not torch.cuda.is_available():
        args.cpu = True
    # The pack is imported as `fewstep` from this checkout, the one import root of tests and benchmarks.
    from tools import packroot
    packroot.import_pack()
    _imported = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def write_model_paths(standin_dir: Path | None, extra_checkpoint: Path | None = None, custom_nodes=(),
                      path: Path | None = None) -> Path:
    """An extra_model_paths.yaml that adds the stand-in folders (and a user checkpoint's folder, and extra
    custom-node folders)."""
    lines = []
    if standin_dir is not None:
        lines += ["fewstep_standins:", f"    base_path: {standin_dir}", *(f"    {f}: {f}" for f in STANDIN_FOLDERS), ""]
    if extra_checkpoint is not None:
        lines += ["fewstep_user:", f"    base_path: {extra_checkpoint.parent}", "    checkpoints: .", ""]
    for i, folder in enumerate(custom_nodes):
        lines += [f"fewstep_custom_nodes_{i}:", f"    custom_nodes: {Path(folder).resolve()}", ""]
    path = path or REPO / ".cache" / "extra_model_paths.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class Server:
    """A real ComfyUI server process on 127.0.0.1 with the pack installed."""

    def __init__(self, port: int | None = None, output_dir: Path | None = None, standin_dir: Path | None = None,
                 extra_checkpoint: Path | None = None, cpu: bool | None = None, extra_args=(),
                 test_nodes: bool = False):
        if port is not None and port_in_use(port):
            raise HostError(f"port {port} is already in use on 127.0.0.1; choose another with PORT=<n>")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="fewstep-out-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(tempfile.mkstemp(prefix="fewstep-server-", suffix=".log")[1])
        if cpu is None:
            cpu = os.environ.get("FEWSTEP_GPU") != "1"
        self.cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                    "--output-directory", str(self.output_dir), "--preview-method", "none"]
        if cpu:
            self.cmd.append("--cpu")
        # test_nodes: a yaml of this server's own, so a server started next to it never loads the test nodes
        paths = write_model_paths(standin_dir, extra_checkpoint, custom_nodes=(TEST_NODES,) if test_nodes else (),
                                  path=self.log_path.with_suffix(".yaml") if test_nodes else None)
        self.cmd += ["--extra-model-paths-config", str(paths), *extra_args]
        self.proc: subprocess.Popen | None = None

    # -- lifecycle
    def start(self, timeout: float = 180.0) -> Server:
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=host_dir(), stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler", timeout=2)
                return self
            except (urllib.error.URLError, OSError, ConnectionError):
                time.sleep(0.5)
        self.stop()
        raise HostError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_logf", None):
            self._logf.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def submit(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "fewstep-tests"})
        if status != 200:
            raise HostError(f"/prompt rejected the workflow ({status}): {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600, poll_timeout: float = 30) -> dict:
        """The prompt's finished /history entry. A poll the server leaves unanswered for ``poll_timeout`` s (a node
        holding the GIL while it writes a multi-GB checkpoint, a loaded 2-core machine) is retried until ``timeout``;
        a server that exits is an error at once."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                hist = self.get(f"/history/{prompt_id}", timeout=poll_timeout)
            except OSError:  # TimeoutError, URLError
                hist = {}
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry.get("outputs"):
                    return entry
            if self.proc.poll() is not None:
                raise HostError(f"server died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.submit(prompt), timeout)

    def images(self, entry: dict) -> list[Path]:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    out.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return out

    def interrupt(self) -> None:
        self.post("/interrupt", {})


def error_message(entry: dict) -> str:
    """The exception message of a failed /history entry ('' when it succeeded)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '')}"
    return ""
