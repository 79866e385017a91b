"""Real server: the graph-editor (UI-format) workflows in workflows/*.json against a real server.

Each UI workflow must convert (as the frontend's graphToPrompt does) to exactly its API twin in workflows/api/,
be what `python -m tools.workflows regenerate` writes today, and run on the server. Every API workflow may use
only node types the server knows, and every FewStep node has a help page in web/docs/ that names its inputs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tools import workflows as W

from tools import workflow_layout as L
from tests.e2e.workflows import small

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
API_NAMES = sorted(p.stem for p in W.API_DIR.glob("*.json"))
UI_NAMES = sorted(p.stem for p in W.UI_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def load_ui(name: str) -> dict:
    return json.loads(W.ui_path(name).read_text())


def load_api(name: str, meta: bool = False) -> dict:
    """The API twin as the server sees it (``meta``: with the ``_meta`` titles the UI file takes its titles from)."""
    prompt = {str(k): v for k, v in json.loads((W.API_DIR / f"{name}.json").read_text()).items()}
    return prompt if meta else W.strip_meta(prompt)


def test_every_api_workflow_has_a_ui_twin_and_back():
    assert API_NAMES, "no API workflows in workflows/api/"
    assert set(API_NAMES) == set(UI_NAMES), (
        "workflows/*.json and workflows/api/*.json differ; run `python -m tools.workflows regenerate`: "
        f"only API {sorted(set(API_NAMES) - set(UI_NAMES))}, only UI {sorted(set(UI_NAMES) - set(API_NAMES))}")


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_is_well_formed(name):
    wf = load_ui(name)
    assert wf["version"] == 0.4 and isinstance(wf["config"], dict)
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, "one Note saying what to load where"
    note = notes[0]["widgets_values"][0]
    files = {v for n in load_api(name).values() for v in n["inputs"].values()
             if isinstance(v, str) and v.endswith((".safetensors", ".ckpt", ".pt", ".sft", ".gguf"))}
    assert files and all(f in note for f in files), f"the Note must name every file loaded: {sorted(files)}\n{note}"
    assert wf["groups"] and all(g["title"] and len(g["bounding"]) == 4 for g in wf["groups"])
    assert wf["extra"]["ds"]["scale"] >= L.MIN_TEXT_SCALE, "opens at a zoom where the frontend draws no text"
    in_group = {n["id"] for n in wf["nodes"] for g in wf["groups"]
                if g["bounding"][0] <= n["pos"][0] and n["pos"][0] + n["size"][0] <= g["bounding"][0] + g["bounding"][2]
                and g["bounding"][1] <= n["pos"][1] - L.TITLE_H
                and n["pos"][1] + n["size"][1] <= g["bounding"][1] + g["bounding"][3]}
    assert in_group == {n["id"] for n in wf["nodes"] if n["type"] != "Note"}, "every node sits inside a group"
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max((l[0] for l in wf["links"]), default=0)
    assert sorted(n["order"] for n in nodes.values()) == list(range(len(nodes)))
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and out["type"] == typ and out["slot_index"] == src_slot
        assert inp["link"] == link_id and inp["type"] in (typ, "*"), (inp, typ)
        assert nodes[src]["order"] < nodes[dst]["order"], "order is not a topological order"
    used = {l[0] for l in wf["links"]}
    for n in nodes.values():
        assert n["mode"] == 0 and (n["type"] in W.VIRTUAL_TYPES or n["properties"]["Node name for S&R"] == n["type"])
        assert len(n["pos"]) == 2 and len(n["size"]) == 2 and n["size"][0] > 0 and n["size"][1] > 0
        for inp in n["inputs"]:
            optional_unlinked = inp.get("shape") == 7 and inp["link"] is None  # an optional socket left empty
            assert inp["link"] in used or optional_unlinked, f"node {n['id']} input {inp['name']} is unlinked or dangling"
        for out in n["outputs"]:
            assert set(out["links"]) <= used


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_converts_to_its_api_twin(name, object_info):
    assert W.ui_to_api(load_ui(name), object_info) == load_api(name)


@pytest.mark.parametrize("name", API_NAMES)
def test_ui_workflow_is_up_to_date(name, object_info):
    """The committed UI file is what the converter writes from the API file with the server's object_info."""
    assert W.dumps(W.api_to_ui(load_api(name, meta=True), object_info, name)) == W.ui_path(name).read_text(), (
        f"workflows/{name}.json is stale; run `python -m tools.workflows regenerate`")


def test_seed_widgets_get_the_frontend_control_value(object_info):
    """seed/noise_seed (and any control_after_generate INT) are followed by the control widget's value."""
    prompt = {"1": {"class_type": "FewStepNoise", "inputs": {"noise_seed": 7}},
              "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    ui = W.api_to_ui(prompt, object_info)
    assert ui["nodes"][0]["widgets_values"] == [7, "fixed"]
    assert ui["nodes"][1]["widgets_values"] == [64, 64, 1]
    assert W.ui_to_api(ui, object_info) == prompt
    if "FewStepLoraFuse" in object_info:  # an INT named "seed" gets the control widget even without the flag
        vals = W.api_to_ui({"1": {"class_type": "FewStepLoraFuse", "inputs": {"seed": 5}}},
                           object_info)["nodes"][0]["widgets_values"]
        assert vals[vals.index(5) + 1] == "fixed"


def test_ui_to_api_follows_reroutes_and_drops_notes(object_info):
    api = load_api(API_NAMES[0])
    wf = W.api_to_ui(api, object_info)
    # Put a Reroute on the first link and a note on the canvas: the prompt must not change.
    first = wf["links"][0]
    link_id, src, src_slot, dst, dst_slot, typ = first
    rid, nid = wf["last_node_id"] + 1, wf["last_node_id"] + 2
    new_link = wf["last_link_id"] + 1
    wf["nodes"].append({"id": rid, "type": "Reroute", "pos": [0, 0], "size": [75, 26], "flags": {}, "order": 99,
                        "mode": 0, "inputs": [{"name": "", "type": "*", "link": link_id}],
                        "outputs": [{"name": "", "type": typ, "links": [new_link]}], "properties": {}})
    wf["nodes"].append({"id": nid, "type": "Note", "pos": [0, 0], "size": [200, 80], "flags": {}, "order": 100,
                        "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": ["hello"]})
    first[3], first[4] = rid, 0
    wf["links"].append([new_link, rid, 0, dst, dst_slot, typ])
    dst_node = next(n for n in wf["nodes"] if n["id"] == dst)
    dst_node["inputs"][dst_slot]["link"] = new_link
    assert W.ui_to_api(wf, object_info) == api
    # A muted (mode 2) node disappears from the prompt.
    extra = W.api_to_ui({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                           "batch_size": 1}}}, object_info)["nodes"][0]
    wf["nodes"].append({**extra, "id": nid + 1, "order": 101, "mode": 2})
    assert W.ui_to_api(wf, object_info) == api


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_uses_only_known_node_types(name, object_info):
    unknown = {n["class_type"] for n in load_api(name).values()} - set(object_info)
    assert not unknown, f"{name} uses node types the server does not have: {sorted(unknown)}"


def test_every_pack_node_is_in_a_workflow_or_documented(object_info):
    ours = {k for k in object_info if k.startswith("FewStep")}
    assert ours
    used = {n["class_type"] for name in API_NAMES for n in load_api(name).values()}
    missing = sorted(k for k in ours if k not in used and not (DOCS / f"{k}.md").is_file())
    assert not missing, f"FewStep nodes with neither a workflow nor a web/docs page: {missing}"


def test_every_pack_node_has_a_doc_page_naming_its_inputs(object_info):
    problems = []
    for node_id, spec in sorted(object_info.items()):
        if not node_id.startswith("FewStep"):
            continue
        page = DOCS / f"{node_id}.md"
        if not page.is_file():
            problems.append(f"{node_id}: no web/docs/{node_id}.md")
            continue
        text = page.read_text()
        for name, _, _ in W._input_specs(spec):
            if f"`{name}`" not in text:
                problems.append(f"{node_id}: input `{name}` not documented")
    for page in sorted(DOCS.glob("*.md")):
        if page.stem not in object_info:
            problems.append(f"web/docs/{page.name} documents no registered node")
    assert not problems, "\n".join(problems)


def test_doc_pages_are_served_to_the_frontend(server):
    """The frontend's node help reads /extensions/<pack>/docs/<node>.md (WEB_DIRECTORY = ./web)."""
    import urllib.request
    with urllib.request.urlopen(server.url + "/extensions/fewstep/docs/FewStepPreset.md", timeout=10) as r:
        assert r.status == 200 and b"FewStep Preset" in r.read()


def test_converted_ui_workflows_pass_validation_and_the_first_runs(server, object_info):
    """Every UI workflow of the SD stand-in, converted as the frontend would, passes /prompt validation (64 px); the
    first one runs to an image, the others are taken off the queue again once accepted (a CPU run costs ~10-40 s
    each). The flow-family workflows name real files and need the stand-in rewrite and the test-only text-encoder
    node: tests/e2e/test_flow_workflows_e2e.py runs them."""
    from tools.standin_prompts import family_of
    t0 = time.time()
    ids = {}
    for name in [n for n in UI_NAMES if family_of(load_api(n)) is None]:
        prompt = small(W.ui_to_api(load_ui(name), object_info), size=64, ckpt="fewstep-standin-sd15.safetensors")
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": "fewstep-tests-ui"})
        assert status == 200, f"{name}: /prompt rejected it ({status}): {json.dumps(body)[:1500]}"
        assert not body.get("node_errors"), body
        ids[name] = body["prompt_id"]
    first, *rest = ids
    server.post("/queue", {"delete": [ids[n] for n in rest]})
    pending = {item[1] for item in server.get("/queue").get("queue_pending", [])}
    assert not pending & {ids[n] for n in rest}, "could not take the accepted prompts off the queue"
    entry = server.wait(ids[first], timeout=300)
    assert entry["status"]["status_str"] == "success", (first, entry["status"])
    assert server.images(entry), f"{first} produced no image"
    for name in rest:  # any that started before the delete must still succeed
        hist = server.get(f"/history/{ids[name]}")
        if ids[name] in hist:
            assert server.wait(ids[name], timeout=300)["status"]["status_str"] == "success", name
    print(f"{len(ids)} UI workflows accepted, {first} ran, in {time.time() - t0:.1f} s")


def test_pack_nodes_sit_next_to_the_core_nodes_they_pair_with(object_info, host):
    """Each FewStep node's category is one core nodes use too; the two KSampler/SamplerCustom companions sit with
    their partner, and every pack node is in the one category table (nodes.common.CATEGORIES)."""
    from fewstep.nodes.common import CATEGORIES
    core = {spec["category"] for k, spec in object_info.items() if not k.startswith("FewStep")}
    ours = {k: spec["category"] for k, spec in object_info.items() if k.startswith("FewStep")}
    assert set(ours.values()) <= set(CATEGORIES.values()) and set(ours.values()) <= core, ours
    assert ours["FewStepSettings"] == object_info["KSampler"]["category"]
    assert ours["FewStepPreset"] == object_info["SamplerCustom"]["category"]
    assert ours["FewStepLoraFuse"] == object_info["LoraLoader"]["category"]
    assert ours["FewStepNoise"] == object_info["RandomNoise"]["category"]
