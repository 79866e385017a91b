"""Real server: the samplers through a real server -- KSampler, SamplerCustom, SamplerCustomAdvanced, the shipped API
workflows, batch-index-stable noise, interrupt, and bad input that must not take the server down."""
from __future__ import annotations

import copy
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.e2e.workflows import API_DIR, load_api, small
from tools import hostenv
from tools.standin_prompts import family_of

pytestmark = pytest.mark.e2e

# The SD workflows; the flow families' workflows name real DiT files and run in test_flow_workflows_e2e.py.
WORKFLOWS = sorted(p.name for p in API_DIR.glob("*.json")
                   if "lora" not in p.name and family_of(json.loads(p.read_text())) is None)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def ok(server, prompt):
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return [pixels(p) for p in server.images(entry)]


def failed(server, prompt) -> str:
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error", "expected an execution error"
    return entry["status"]["messages"].__repr__()


STANDIN = "fewstep-standin-sd15.safetensors"  # the SDXL workflow runs on the SD1.5 stand-in here


@pytest.mark.parametrize("name", WORKFLOWS)
def test_shipped_api_workflow_runs(server, name):
    prompt = small(load_api(name), size=64, batch=1, ckpt=STANDIN)
    if not any(n["class_type"] in ("SaveImage", "PreviewImage") for n in prompt.values()):
        # Save Fused + Export LoRA: files, and the nodes' UI text naming them.
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        writers = [k for k, n in prompt.items() if n["class_type"] in ("FewStepSaveFused", "FewStepExportLora")]
        texts = [t for k in writers for t in entry["outputs"].get(k, {}).get("text", [])]
        assert len(writers) == 2 and len(texts) == 2 and all(".safetensors" in t for t in texts), texts
        return
    images = ok(server, prompt)
    assert len(images) == 1 and images[0].std() > 1.0


def tcd_custom(batch=1, batch_index=None, batch_offset=0, seed=11):
    """SamplerCustomAdvanced + FewStep Noise + FewStep TCD: image k depends only on (seed, k)."""
    p = small(load_api("fewstep_pcm_samplercustomadvanced.json"), size=64, batch=batch)
    p["10"] = {"class_type": "FewStepSamplerTCD", "inputs": {"gamma": 0.6, "final_step": "x0", "noise_device": "cpu",
                                                           "batch_offset": batch_offset, "fused": "auto"}}
    p["11"] = {"class_type": "FewStepScheduleTCD", "inputs": {"model": ["1", 0], "steps": 3, "strength": 1.0,
                                                            "original_steps": "50"}}
    p["12"]["inputs"]["noise_seed"] = seed
    p["13"]["inputs"]["cfg"] = 1.0  # one UNet pass per step
    if batch_index is not None:
        p["20"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0], "batch_index": batch_index,
                                                              "length": 1}}
        p["6"]["inputs"]["latent_image"] = ["20", 0]
    return p


def test_batch_size_and_single_image_rerender(server):
    batch = ok(server, tcd_custom(batch=3))
    assert len(batch) == 3
    two = ok(server, tcd_custom(batch=2))
    alone = ok(server, tcd_custom(batch=3, batch_index=2, batch_offset=2))
    for a, b in zip(two, batch[:2]):
        assert np.abs(a - b).max() <= 1
    assert np.abs(alone[0] - batch[2]).max() <= 1
    assert np.abs(batch[0] - batch[1]).max() > 10


def test_ksampler_seed_reproduces_and_gamma_matters(server):
    base = small(load_api("fewstep_tcd_ksampler.json"), size=64)
    a, = ok(server, base)
    b, = ok(server, copy.deepcopy(base))
    other = copy.deepcopy(base)
    other["2"]["inputs"]["gamma"] = 1.0
    c, = ok(server, other)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 10


def test_interrupt_mid_run_keeps_server_serving(server):
    p = small(load_api("fewstep_tcd_ksampler.json"), size=128)
    p["6"]["inputs"]["steps"] = 40
    p["6"]["inputs"]["scheduler"] = "fewstep_lcm100"
    pid = server.submit(p)
    timer = threading.Timer(6.0, server.interrupt)
    timer.start()
    t0 = time.time()
    entry = server.wait(pid, timeout=300)
    timer.cancel()
    msgs = repr(entry["status"].get("messages"))
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in msgs, msgs
    assert time.time() - t0 < 40, "interrupt did not stop the run between steps"
    images = ok(server, small(load_api("fewstep_tcd_ksampler.json"), size=64))
    assert images[0].std() > 1.0


@pytest.mark.parametrize("node,inputs,needle", [
    ("FewStepSamplerTCD", {"gamma": 1.5}, "gamma"),
    ("FewStepScheduleTCD", {"steps": 0}, "steps"),
    ("FewStepScheduleTCD", {"strength": 0.0}, "strength"),
])
def test_out_of_range_inputs_rejected_at_validation(server, node, inputs, needle):
    p = small(load_api("fewstep_tcd_samplercustom.json"), size=64)
    target = next(n for n in p.values() if n["class_type"] == node)
    target["inputs"].update(inputs)
    status, body = server.post("/prompt", {"prompt": p})
    assert status == 400 and needle in str(body)


def test_unknown_preset_rejected(server):
    p = small(load_api("fewstep_preset_hypersd.json"), size=64)
    p["10"]["inputs"]["preset"] = "Turbo 3000"
    status, body = server.post("/prompt", {"prompt": p})
    if status == 200:  # the host does not validate V3 combo values at /prompt; the node must fail loudly
        entry = server.wait(body["prompt_id"])
        body = hostenv.error_message(entry)
        assert "FewStep Preset" in body
    assert "Turbo 3000" in str(body) and "Hyper-SD 4-step" in str(body)


@pytest.mark.parametrize("schedule,needle", [
    ({"class_type": "FewStepScheduleLCM", "inputs": {"steps": 20, "strength": 0.3, "original_steps": "50"}},
     "FewStep LCM Schedule: steps (20) exceeds"),
    ({"class_type": "FewStepScheduleFixed", "inputs": {"timesteps": "200, 800"}}, "FewStep Fixed Timesteps"),
])
def test_impossible_schedules_fail_with_node_name_and_server_survives(server, schedule, needle):
    p = small(load_api("fewstep_tcd_samplercustom.json"), size=64)
    schedule = copy.deepcopy(schedule)
    schedule["inputs"]["model"] = ["1", 0]
    p["11"] = schedule
    status, body = server.post("/prompt", {"prompt": p})  # a 400 when the node can tell at /prompt (timesteps)
    if status == 200:
        entry = server.wait(body["prompt_id"])
        assert entry["status"]["status_str"] == "error", "expected an execution error"
        body = entry["status"]["messages"]
    assert needle in str(body)
    assert "KSampler" in server.get("/object_info/KSampler")
