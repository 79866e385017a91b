"""Bad set-up input gets a clear message and a non-zero exit (COMFYUI_DIR, CHECKPOINT, PORT)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def run(args, **env):
    full = {**os.environ, **env}
    return subprocess.run(args, cwd=REPO, env=full, capture_output=True, text=True, timeout=300)


def test_comfyui_dir_that_is_not_comfyui(tmp_path):
    r = run([sys.executable, "tools/setup_env.py"], COMFYUI_DIR=str(tmp_path))
    assert r.returncode == 2
    assert f"COMFYUI_DIR={tmp_path} is not a ComfyUI install" in r.stderr


def test_demo_checkpoint_missing(tmp_path):
    r = run([sys.executable, "-m", "tools.demo"], CHECKPOINT=str(tmp_path / "nope.safetensors"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_demo_checkpoint_not_sd(standin_dir):
    lora = standin_dir / "loras" / "style-sd15-kohya.safetensors"
    r = run([sys.executable, "-m", "tools.demo"], CHECKPOINT=str(lora))
    assert r.returncode == 2 and "not an SD1.5 or SDXL checkpoint" in r.stderr


def test_demo_checkpoint_pickle_refused(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04not really a pickle")
    r = run([sys.executable, "-m", "tools.demo"], CHECKPOINT=str(bad))
    assert r.returncode == 2 and "never unpickles" in r.stderr


def test_serve_port_in_use(standin_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = run([sys.executable, "-m", "tools.serve", "--port", str(port)])
    assert r.returncode == 2 and f"port {port} is already in use" in r.stderr


def test_serve_answers_object_info_with_the_pack(standin_dir):
    import json
    import time
    import urllib.request
    from tools.hostenv import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, "make serve exited early"
                time.sleep(1)
        else:
            pytest.fail("make serve did not answer /object_info")
        assert {"FewStepSamplerTCD", "FewStepPreset", "FewStepSettings"} <= set(info)
    finally:
        proc.terminate()
        proc.wait(30)


def test_make_setup_on_a_set_up_checkout_prints_one_line():
    """`make setup` prints only its own progress lines; once everything is in place, a single 'up to date' line."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed here")
    first = run(["make", "--no-print-directory", "setup"])
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(line.startswith("fewstep setup: ") for line in (first.stdout + first.stderr).splitlines()), first
    again = run(["make", "--no-print-directory", "setup"])
    assert again.returncode == 0 and again.stdout == "", again
    lines = again.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewstep setup: up to date (host "), again.stderr


def _pip_probe(*args):
    code = ("import sys; from pathlib import Path; from tools import setup_env as s; s.PY = Path(sys.executable); "
            f"s.pip('the probe', *{list(args)!r})")
    return run([sys.executable, "-c", code])


def test_setup_hides_pip_output_unless_pip_fails():
    ok = _pip_probe("--no-index", "pip")  # already installed: pip prints "Requirement already satisfied" and more
    assert ok.returncode == 0, ok.stderr
    assert re.fullmatch(r"fewstep setup: installing the probe \.\.\. done \(\d+ s\)\n", ok.stderr), ok.stderr
    bad = _pip_probe("--no-index", "fewstep-no-such-package==0")
    assert bad.returncode == 1
    assert "installing the probe ... failed" in bad.stderr
    assert "No matching distribution found for fewstep-no-such-package==0" in bad.stderr  # pip's own words shown
    assert "pip install failed (its output is above)" in bad.stderr
