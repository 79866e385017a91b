"""Real server, hostile client: each bad value is an HTTP 400 at /prompt naming the node that holds it, and none
produces an image. Before this, NaN strengths fused into black images, unknown dropdown values ran silently, bad
FewStep Settings values were reported at the KSampler, an empty export prefix wrote a hidden file after the work,
and a 1 MB string came back whole in the error."""
from __future__ import annotations

import copy
import json
import time

import pytest

from tools import hostenv

from tests.e2e.workflows import load_api, small

pytestmark = pytest.mark.e2e

NAN = "NaN"  # as a client sends it; the host turns it into float('nan') and lets it through


def fuse_export(prefix: str) -> dict:
    """The LoRA fuse workflow with FewStep Export LoRA on the fused model as its only output (small rank)."""
    p = small(load_api("fewstep_lora_fuse.json"), size=64)
    for k in [k for k, n in p.items() if n["class_type"] not in ("CheckpointLoaderSimple", "FewStepLoraFuse",
                                                                   "FewStepLoraStack")]:
        del p[k]
    fid = next(k for k, n in p.items() if n["class_type"] == "FewStepLoraFuse")
    p[fid]["inputs"].update(accel_lora="none", style_strength_1=0.8)
    p[fid]["inputs"].pop("style_stack", None)
    p["90"] = {"class_type": "FewStepExportLora",
               "inputs": {"model": [fid, 0], "mode": "rank", "rank": 4, "energy": 0.99, "dtype": "fp16", "seed": 0,
                          "filename_prefix": prefix}}
    return p


def with_value(name: str, class_type: str, **values) -> tuple[dict, str]:
    p = small(load_api(name), size=64)
    nid = next(k for k, n in p.items() if n["class_type"] == class_type)
    p[nid]["inputs"].update(values)
    return p, nid


def lcm_schedule(original_steps) -> tuple[dict, str]:
    p = small(load_api("fewstep_tcd_samplercustom.json"), size=64)
    p["11"]["class_type"] = "FewStepScheduleLCM"
    p["11"]["inputs"]["original_steps"] = original_steps
    return p, "11"


CASES = {
    "fuse accel_strength NaN": (lambda: with_value("fewstep_lora_fuse.json", "FewStepLoraFuse", accel_strength=NAN),
                                "FewStep LoRA Fuse: accel_strength is nan; it must be a finite number in [-10, 10]"),
    "fuse lines_beta NaN": (lambda: with_value("fewstep_lora_fuse.json", "FewStepLoraFuse", lines_beta=NAN),
                            "FewStep LoRA Fuse: lines_beta is nan; it must be a finite number in [-2, 2]"),
    "fuse style strength inf": (lambda: with_value("fewstep_lora_fuse.json", "FewStepLoraFuse",
                                                   style_strength_1="inf"), "FewStep LoRA Fuse: style_strength_1"),
    "TCD schedule original_steps 7": (
        lambda: with_value("fewstep_tcd_samplercustom.json", "FewStepScheduleTCD", original_steps="7"),
        "FewStep TCD Schedule: original_steps is '7'; it must be one of '50', '100', '25'"),
    "LCM schedule original_steps 1000": (lambda: lcm_schedule("1000"),
                                         "FewStep LCM Schedule: original_steps is '1000'; it must be one of"),
    "LCM schedule original_steps abc": (lambda: lcm_schedule("abc"),
                                        "FewStep LCM Schedule: original_steps is 'abc'; it must be one of"),
    "Settings noise_device": (lambda: with_value("fewstep_tcd_ksampler.json", "FewStepSettings", noise_device="gpu0"),
                              "FewStep Settings (KSampler): noise_device is 'gpu0'; it must be one of 'cpu', 'gpu'"),
    "Settings final_step": (lambda: with_value("fewstep_tcd_ksampler.json", "FewStepSettings", final_step="x1"),
                            "FewStep Settings (KSampler): final_step is 'x1'; it must be one of 'x0', 'diffusers'"),
    "Settings fused": (lambda: with_value("fewstep_tcd_ksampler.json", "FewStepSettings", fused="always"),
                       "FewStep Settings (KSampler): fused is 'always'; it must be one of 'auto', 'on', 'off'"),
    "Preset gamma NaN": (lambda: with_value("fewstep_preset_hypersd.json", "FewStepPreset", gamma=NAN),
                         "FewStep Preset: gamma is nan; it must be a finite number in [-1, 1]"),
    "Export empty prefix": (lambda: (fuse_export(""), "90"), "FewStep Export LoRA: filename_prefix is empty"),
    "Export escaping prefix": (lambda: (fuse_export("../../escape"), "90"),
                               "FewStep Export LoRA: filename_prefix '../../escape' leaves the output folder"),
    "Export hidden prefix": (lambda: (fuse_export("loras/.secret"), "90"),
                             "FewStep Export LoRA: filename_prefix 'loras/.secret' would write a hidden file"),
    "1 MB timesteps": (lambda: fixed_timesteps("8" * (1 << 20)), "FewStep Fixed Timesteps: timesteps is 1048576 "
                                                                 "characters long"),
    "bad timesteps item": (lambda: fixed_timesteps("800, 4OO, " + "9" * 5000),
                           "FewStep Fixed Timesteps: timesteps must be integers separated by commas; '4OO' is not one"),
}


def fixed_timesteps(text: str) -> tuple[dict, str]:
    p = small(load_api("fewstep_tcd_samplercustom.json"), size=64)
    p["11"] = {"class_type": "FewStepScheduleFixed", "inputs": {"model": ["1", 0], "timesteps": text}}
    return p, "11"


def outputs_in(server) -> set:
    return {p for p in server.output_dir.rglob("*") if p.is_file()}


def test_each_listed_case_is_a_400_naming_the_node_that_holds_the_value(server):
    before_files, before_hist = outputs_in(server), set(server.get("/history"))
    failures = []
    for case, (build, needle) in CASES.items():
        prompt, holder = build()
        t0 = time.time()
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": "fewstep-hostile"})
        seconds = time.time() - t0
        errors = (body or {}).get("node_errors", {}) if isinstance(body, dict) else {}
        text = json.dumps(errors.get(holder, {}))
        blamed = sorted(k for k, v in errors.items() if v.get("errors"))
        if status != 400 or needle not in text or blamed != [holder] or len(json.dumps(body)) > 20_000:
            failures.append(f"{case}: status {status}, blamed {blamed} (want [{holder}]), {len(json.dumps(body))} "
                            f"bytes: {json.dumps(body)[:600]}")
        assert seconds < 30, f"{case}: /prompt took {seconds:.1f} s (the check must come before any work)"
    assert not failures, "\n".join(failures)
    time.sleep(1.0)
    assert set(server.get("/history")) == before_hist, "a refused prompt reached the queue"
    assert outputs_in(server) == before_files, "a refused prompt wrote a file"
    assert "FewStepLoraFuse" in server.get("/object_info/FewStepLoraFuse")


def test_a_good_value_next_to_them_still_runs(server):
    """The checks refuse only what is wrong: the same workflows with good values run and make images."""
    p, _ = with_value("fewstep_tcd_ksampler.json", "FewStepSettings", noise_device="cpu", fused="off",
                      final_step="diffusers")
    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", hostenv.error_message(entry)
    assert len(server.images(entry)) == 1


def test_export_shows_what_it_wrote(server):
    """FewStep Export LoRA's UI output (also in /history) names the file, relative to the output folder, and its
    size; the file is there with that size."""
    entry = server.wait(server.submit(fuse_export("loras/fewstep_hostile_e2e")), 1800, poll_timeout=120)
    assert entry["status"]["status_str"] == "success", hostenv.error_message(entry)
    text = "\n".join(entry["outputs"]["90"]["text"])
    line = next(ln for ln in text.splitlines() if ln.startswith("file: "))
    rel = line[len("file: "):].split(" in the output folder")[0]
    path = server.output_dir / rel
    assert rel.startswith("loras/fewstep_hostile_e2e_") and path.is_file(), line
    assert f"{path.stat().st_size} bytes" in line, line


def test_a_linked_value_is_checked_where_it_arrives(server):
    """A value that only exists at run time (a FLOAT from another node's output) is unknown at /prompt; the node
    that receives it checks it when it runs: FewStep Preset's cfg (1.5 for LCM-LoRA) wired into the TCD sampler's
    gamma (allowed [0, 1]) is an execution error naming the TCD sampler, and no image is written."""
    p = small(load_api("fewstep_tcd_samplercustom.json"), size=64)
    p["20"] = {"class_type": "FewStepPreset", "inputs": {"model": ["1", 0], "preset": "LCM-LoRA", "steps": 0,
                                                         "strength": 1.0, "gamma": -1.0}}
    p["10"]["inputs"]["gamma"] = ["20", 2]
    before = outputs_in(server)
    status, body = server.post("/prompt", {"prompt": copy.deepcopy(p)})
    assert status == 200, body
    entry = server.wait(body["prompt_id"])
    msg = hostenv.error_message(entry)
    assert entry["status"]["status_str"] == "error" and "FewStep TCD Sampler: gamma is 1.5" in msg, msg
    assert outputs_in(server) == before
