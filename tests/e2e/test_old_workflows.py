"""Real server: workflow files saved before the widgets changed (copies of the earlier workflows/*.json and their API
twins, in tests/fixtures/old_workflows/) still load with their values meaning what they meant.

What changed since: the samplers' technical options are marked advanced (hidden in the graph editor, still saved
and sent in the same place), FewStep Settings and FewStep Preset moved category, and the graph editor draws
gamma -1 / steps 0 as "from preset". Widget order and types did not change, so an old file's positional
widgets_values map onto the same inputs, and gamma -1 / steps 0 still mean "the preset's".
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import workflows as W
from tests.e2e.workflows import small

pytestmark = pytest.mark.e2e

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "old_workflows"
NAMES = sorted(p.stem for p in OLD.glob("*.json"))


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def old_ui(name):
    return json.loads((OLD / f"{name}.json").read_text())


def old_api(name):
    return W.strip_meta(json.loads((OLD / "api" / f"{name}.json").read_text()))


def test_fixtures_are_there():
    assert len(NAMES) >= 6 and all((OLD / "api" / f"{n}.json").is_file() for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_old_ui_file_maps_onto_the_same_inputs(name, object_info):
    """The old positional widgets_values, read with today's node definitions, give the old API prompt exactly:
    every value lands on the input it was saved for."""
    assert W.ui_to_api(old_ui(name), object_info) == old_api(name)


def test_old_sentinels_are_still_accepted_and_mean_from_preset(object_info):
    seen = {(n["class_type"], k, v) for name in NAMES for n in old_api(name).values()
            for k, v in n["inputs"].items() if (k, v) in (("gamma", -1.0), ("steps", 0))}
    assert ("FewStepPreset", "gamma", -1.0) in seen and ("FewStepPreset", "steps", 0) in seen
    assert ("FewStepSettings", "gamma", -1.0) in seen
    for node, name, value in seen:  # the server's range still takes the old value
        spec = {n: o for n, _, o in W._input_specs(object_info[node])}[name]
        assert spec["min"] <= value and "from preset" in spec["tooltip"], (node, name, spec)


def test_old_api_files_pass_validation(server):
    """Every old API file is accepted by /prompt (types, ranges, options); nothing is left running (the current
    workflows, which use the same nodes, are run by test_workflows_ui and test_samplers_e2e)."""
    ids = []
    try:
        for name in NAMES:
            status, body = server.post("/prompt", {"prompt": small(old_api(name), size=64),
                                                   "client_id": "fewstep-tests-old"})
            assert status == 200 and not body.get("node_errors"), f"{name}: {json.dumps(body)[:800]}"
            ids.append(body["prompt_id"])
    finally:
        server.post("/queue", {"delete": ids})
        server.interrupt()
