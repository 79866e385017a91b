"""Tier c: every flow-matching / DiT stand-in family through a real ComfyUI server, with core nodes only.

One API workflow per family (``tests/e2e/flow_workflows``): core UNETLoader -> ModelSamplingSD3 / ModelSamplingFlux /
ModelSamplingAuraFlow (where users put them) -> KSampler (euler, simple, 2 steps, cfg 1) -> VAELoader + VAEDecode ->
SaveImage / SaveAnimatedWEBP; Wan 2.2 A14B runs its two experts in two KSamplerAdvanced (step 0->1 on the high-noise
expert, 1->2 on the low-noise one).  The text encoders are replaced in tests only by the test node
``FewStepTestConditioning`` (tests/custom_nodes), loaded by the flow server alone (``flow_server`` in
tests/e2e/conftest.py, ``Server(test_nodes=True)``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

pytestmark = pytest.mark.e2e

FLOW_DIR = Path(__file__).resolve().parent / "flow_workflows"
WORKFLOWS = sorted(p.stem for p in FLOW_DIR.glob("*.json"))
LOAD_PROBLEMS = ("unet missing", "unet unexpected", "left over keys", "Missing VAE keys", "ERROR UNSUPPORTED")


def load(name: str) -> dict:
    return json.loads((FLOW_DIR / f"{name}.json").read_text())


def frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB")).astype(np.float32) for f in ImageSequence.Iterator(im)]


def test_workflows_name_the_standin_files():
    """The workflows load exactly the files tools/standins builds (a renamed stand-in breaks this, not the run)."""
    from tools import standins
    names = {f.name for fam in standins.FLOW_FAMILIES.values() for f in (*fam.models.values(), fam.vae)}
    seen = set()
    for wf in WORKFLOWS:
        for node in load(wf).values():
            for k in ("unet_name", "vae_name"):
                if k in node["inputs"]:
                    assert node["inputs"][k] in names, (wf, node["inputs"][k])
                    seen.add(node["inputs"][k])
    assert seen == names, names - seen
    assert set(WORKFLOWS) == {"sd3", "flux", "wan21_t2v", "wan22_a14b", "qwen_image", "hunyuan_video"}


def test_test_node_is_registered_only_as_a_test_node(flow_server, tmp_path):
    info = flow_server.get("/object_info/FewStepTestConditioning")["FewStepTestConditioning"]
    assert "fewstep_test_nodes" in info["python_module"] and "TESTS ONLY" in info["description"]
    from tools import hostenv
    assert "custom_nodes" not in hostenv.write_model_paths(None, path=tmp_path / "plain.yaml").read_text()
    spec = info["input"]["required"]["family"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert {"sd3", "flux", "wan", "qwen_image", "hunyuan_video"} <= set(options), options


@pytest.mark.parametrize("name", WORKFLOWS)
def test_family_workflow_runs_and_writes_finite_images(flow_server, name):
    from tools import hostenv
    log_before = len(flow_server.log_text())
    t0 = time.perf_counter()
    entry = flow_server.run(load(name), timeout=300)
    dt = time.perf_counter() - t0
    assert entry["status"]["status_str"] == "success", hostenv.error_message(entry) + "\n" + flow_server.log_tail()
    log = flow_server.log_text()[log_before:]
    problems = [line for line in log.splitlines() if any(p in line for p in LOAD_PROBLEMS)]
    assert problems == [], problems
    paths = flow_server.images(entry)
    assert paths, entry.get("outputs")
    imgs = [f for p in paths for f in frames(p)]
    video = name.startswith(("wan", "hunyuan"))
    assert len(imgs) == (5 if video else 1), (name, len(imgs))  # 5 frames = 2 latent frames of the video VAEs
    for arr in imgs:
        assert np.isfinite(arr).all() and arr.std() > 1.0, f"{name}: a flat frame (NaN/Inf decoded to a constant)"
    print(f"{name}: {len(imgs)} image(s) {imgs[0].shape} in {dt:.1f} s (first run of a family includes loading)")
