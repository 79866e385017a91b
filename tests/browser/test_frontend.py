"""Tier d: the real ComfyUI frontend (comfyui-frontend-package) in headless Debian chromium.

Nothing is installed at test time: without `chromium` on PATH every test here is skipped with the reason.
The page is loaded from a real server; each UI workflow in workflows/*.json is loaded with app.loadGraphData and
the frontend's own graphToPrompt must give exactly the API twin in workflows/api/ (and what tools.workflows.
ui_to_api gives); a re-save must keep the links and widget values.
"""
from __future__ import annotations

import json

import pytest

from tools import workflows as W
from tests.browser.cdp import Browser, chromium_path

pytestmark = pytest.mark.e2e

NAMES = sorted(p.stem for p in W.UI_DIR.glob("*.json"))
READY = "!!(window.app && window.app.graph && window.app.canvas && document.querySelector('canvas'))"


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if not exe:
        reason = "chromium is not installed (apt-get install -y chromium); frontend tests skipped"
        print(reason)
        pytest.skip(reason)
    b = Browser(exe).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def frontend_results(browser, server):
    scripts = ["JSON.stringify({title: document.title, version: window.__COMFYUI_FRONTEND_VERSION__ ?? null, "
               "nodeDefs: Object.keys(LiteGraph.registered_node_types).filter(k => k.startsWith('FewStep'))})"]
    for name in NAMES:
        wf = W.ui_path(name).read_text()
        scripts.append(f"(async () => {{ await window.app.loadGraphData({wf}); const p = await window.app.graphToPrompt();"
                       " const missing = window.app.graph._nodes.filter(n => n.has_errors ||"
                       " !LiteGraph.registered_node_types[n.type]).map(n => n.type);"
                       f" return JSON.stringify({{output: p.output, workflow: p.workflow, missing}}); }})()")
    values, logs = browser.run(server.url + "/", scripts, ready_js=READY, timeout=120)
    return json.loads(values[0]), {n: json.loads(v) for n, v in zip(NAMES, values[1:])}, logs


def test_frontend_is_served_and_registers_the_pack(frontend_results, server):
    page, _, _ = frontend_results
    ours = {k for k in server.get("/object_info") if k.startswith("FewStep")}
    assert ours and ours <= set(page["nodeDefs"]), sorted(ours - set(page["nodeDefs"]))


@pytest.mark.parametrize("name", NAMES)
def test_frontend_graph_to_prompt_equals_api_workflow(name, frontend_results, server):
    _, results, logs = frontend_results
    got = {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in results[name]["output"].items()}
    api = {str(k): v for k, v in json.loads((W.API_DIR / f"{name}.json").read_text()).items()}
    assert got == api, f"{name}: the frontend sends a different prompt; console: {logs[-10:]}"
    ui = json.loads(W.ui_path(name).read_text())
    assert W.ui_to_api(ui, server.get("/object_info")) == got


@pytest.mark.parametrize("name", NAMES)
def test_frontend_loads_the_workflow_with_no_missing_node(name, frontend_results):
    """Every node of the workflow (the flow families' ones included: Wan 2.2 two-expert, Qwen-Image, Flux, SD3) is a
    type the frontend knows, so it opens without the missing-nodes dialog."""
    _, results, logs = frontend_results
    assert results[name]["missing"] == [], f"{name}: missing node types {results[name]['missing']}; {logs[-5:]}"
    ours = json.loads(W.ui_path(name).read_text())
    assert len(results[name]["workflow"]["nodes"]) == len(ours["nodes"])


@pytest.mark.parametrize("name", NAMES)
def test_frontend_resave_keeps_links_and_widgets(name, frontend_results):
    _, results, _ = frontend_results
    saved = results[name]["workflow"]
    ours = json.loads(W.ui_path(name).read_text())
    assert saved["links"] == ours["links"]
    fe = {n["id"]: n for n in saved["nodes"]}
    for n in ours["nodes"]:
        assert fe[n["id"]]["widgets_values"] == n["widgets_values"], n["type"]
        assert fe[n["id"]]["inputs"] == n["inputs"], n["type"]
        assert fe[n["id"]]["outputs"] == n["outputs"], n["type"]
