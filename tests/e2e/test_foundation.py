"""Real server: the pack in a real ComfyUI server -- registration, import time, a core LCM run, bad input."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

CKPT = "fewstep-standin-sd15.safetensors"


def core_lcm_prompt(seed=1, steps=4, size=128):
    """The stock ComfyUI LCM recipe: ModelSamplingDiscrete(lcm) + sampler lcm + scheduler simple."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": False}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse at dusk"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                   "sampler_name": "lcm", "scheduler": "simple", "denoise": 1.0,
                                                   "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "core_lcm"}},
    }


def assert_real_image(path):
    arr = np.asarray(Image.open(path)).astype(np.float32)
    assert arr.ndim == 3 and arr.shape[2] in (3, 4)
    assert arr.std() > 1.0, f"{path} is flat (NaN/Inf in the latent decode to a constant image)"


def test_pack_nodes_registered_with_docs(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("FewStep")}
    assert len(ours) >= 10, sorted(ours)
    for node_id, spec in ours.items():
        assert spec.get("description"), f"{node_id} has no description"
        assert spec["python_module"].endswith("fewstep"), spec["python_module"]
        for section in ("required", "optional"):
            for name, inp in spec["input"].get(section, {}).items():
                opts = inp[1] if len(inp) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_import_time_under_budget(server):
    """The host's import-time line for the pack. The 0.1 s budget itself is guaranteed by the import doing no work
    (next test): a loaded CI machine can stall any process for a few hundred ms, so this line only catches a
    regression to real import work (a second or more)."""
    log = server.log_text()
    m = re.search(r"^\s*([\d.]+) seconds(?: \(IMPORT FAILED\))?: .*custom_nodes[/\\]fewstep\s*$", log, re.M)
    assert m, "no import-time line for fewstep in the host log:\n" + server.log_tail()
    assert "IMPORT FAILED" not in m.group(0), m.group(0)
    print(f"fewstep import time in the host log: {m.group(1)} s (budget 0.1 s)")
    assert float(m.group(1)) <= 1.0, m.group(0)


def test_pack_import_does_no_work():
    """Importing the pack defines the entry point and nothing else: no module (torch, comfy, triton, safetensors, the
    pack's own submodules) is imported, so its import time is that of one tiny file."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    code = ("import importlib.util, sys; before = set(sys.modules); "
            f"spec = importlib.util.spec_from_file_location('fewstep_probe', {str(root / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(root)!r}]); m = importlib.util.module_from_spec(spec); "
            "sys.modules['fewstep_probe'] = m; spec.loader.exec_module(m); "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['fewstep_probe']", out.stdout


def test_core_lcm_workflow_runs_on_standin(server):
    entry = server.run(core_lcm_prompt())
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = server.images(entry)
    assert len(images) == 1
    assert_real_image(images[0])


def test_bad_workflow_rejected_and_server_keeps_serving(server):
    bad = core_lcm_prompt()
    bad["1"]["inputs"]["ckpt_name"] = "does-not-exist.safetensors"
    status, body = server.post("/prompt", {"prompt": bad})
    assert status == 400 and "ckpt_name" in str(body)
    assert "KSampler" in server.get("/object_info/KSampler")


def test_server_starts_without_tracebacks(server):
    """The server's start-up log (until it listens) holds no traceback and no failed import: the development host
    leaves out the two audio node files that need torchaudio, which has no release for this torch (setup_env.py)."""
    import os
    log = server.log_text()
    marker = "To see the GUI go to"
    assert marker in log, server.log_tail()
    start = log.split(marker, 1)[0]
    if os.environ.get("COMFYUI_DIR"):  # an existing install's other custom nodes are not ours to judge
        print("COMFYUI_DIR is set: only the pack's own start-up lines are checked")
        assert "fewstep" not in "".join(b for b in start.split("Traceback")[1:]), start
        return
    assert "Traceback" not in start, start
    assert "IMPORT FAILED" not in start and "Cannot import" not in start, start
