"""Tier d: the real ComfyUI frontend (comfyui-frontend-package) in headless Debian chromium, in a 1600x1000 window.

Nothing is installed at test time: without `chromium` on PATH every test here is skipped with the reason.
The page is loaded from a real server; each UI workflow in workflows/*.json is loaded with app.loadGraphData and
the frontend's own graphToPrompt must give exactly the API twin in workflows/api/ (and what tools.workflows.
ui_to_api gives); a re-save must keep the links and widget values. Each workflow must open with zero missing nodes,
at a zoom where the frontend draws text, with every node on screen and none overlapping, and with labels and values
side by side untruncated; a screenshot of each is kept in out/browser/ (small copies for the README in
out/browser/small/, which `make screenshots` copies to docs/).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tools import workflows as W
from tools import workflow_layout as L
from tests.browser.cdp import Browser, Screenshot, chromium_path

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "out" / "browser"
NAMES = sorted(p.stem for p in W.UI_DIR.glob("*.json"))
OLD = REPO / "tests" / "fixtures" / "old_workflows"  # workflow files saved before the widgets changed
OLD_NAMES = sorted(p.stem for p in OLD.glob("*.json"))
PROMPT_JS = ("(async () => { const p = await window.app.graphToPrompt();"
             " return JSON.stringify({output: p.output, workflow: p.workflow}); })()")
READY = "!!(window.app && window.app.graph && window.app.canvas && document.querySelector('canvas'))"
WIDGET_MARGINS = 90  # LiteGraph draws "label  value" inside the widget less 2x15 margins, 5 + 20 padding, 5 gap

# Runs after a workflow is loaded (restoring its saved view): what a user sees at first sight.
VIEW_JS = """(async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const c = window.app.canvas, ds = c.ds, g = window.app.graph;
  c.setDirty(true, true); c.draw(true, true);
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  const rects = g.nodes.map(n => ({id: n.id, type: n.type,
    x0: (n.pos[0] + ds.offset[0]) * ds.scale, y0: (n.pos[1] - T + ds.offset[1]) * ds.scale,
    x1: (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale, y1: (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale}));
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = LiteGraph.NODE_SUBTEXT_SIZE + 'px ' + (LiteGraph.NODE_FONT || 'Arial');
  const cut = [], shownAdvanced = [], hiddenAdvanced = [];
  for (const n of g.nodes) for (const w of n.widgets ?? []) {
    const visible = n.isWidgetVisible ? n.isWidgetVisible(w) : !w.hidden;
    if (w.options?.advanced) (visible ? shownAdvanced : hiddenAdvanced).push(n.type + '.' + w.name);
    if (!visible || !['number', 'combo', 'text', 'toggle'].includes(w.type)) continue;
    const label = String(w.displayName ?? w.label ?? w.name), value = String(w._displayValue ?? w.value);
    const need = ctx.measureText(label).width + ctx.measureText(value).width + %(margins)d;
    if (need > (w.width || n.size[0])) cut.push(`${n.type}.${w.name}: "${label}" + "${value}" need ${Math.ceil(need)} px, node ${n.size[0]}`);
  }
  const missing = g.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
  return JSON.stringify({scale: ds.scale, lowQuality: c.low_quality, window: [innerWidth, innerHeight], rects,
                         missing, cut, shownAdvanced, hiddenAdvanced, groups: g.groups?.length ?? g._groups?.length});
})()""" % {"margins": WIDGET_MARGINS}

# A new node as a user adds it from the menu: what the pack's graph-editor extension does to it.
NEW_NODES_JS = """(async () => {
  const g = window.app.graph, out = {};
  const fuse = LiteGraph.createNode('FewStepLoraFuse'); g.add(fuse);
  const w = name => fuse.widgets.find(x => x.name === name);
  const vis = x => fuse.isWidgetVisible(x);
  out.fuse_linear = {seed: vis(w('seed')), control: w('seed').linkedWidgets.map(vis), drop_p: vis(w('drop_p')),
                     density: vis(w('density')), seed_control_value: w('seed').linkedWidgets[0].value};
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = LiteGraph.NODE_SUBTEXT_SIZE + 'px ' + (LiteGraph.NODE_FONT || 'Arial');
  out.fuse_cut = fuse.widgets.filter(x => vis(x) && ['number', 'combo', 'text', 'toggle'].includes(x.type))
    .filter(x => ctx.measureText(String(x.displayName ?? x.label ?? x.name)).width
                 + ctx.measureText(String(x._displayValue ?? x.value)).width + %(margins)d > fuse.size[0])
    .map(x => x.name);
  const mode = w('merge_mode'); mode.value = 'dare'; mode.callback?.(mode.value);
  out.fuse_dare = {seed: vis(w('seed')), control: w('seed').linkedWidgets.map(vis), drop_p: vis(w('drop_p')),
                   density: vis(w('density'))};
  const preset = LiteGraph.createNode('FewStepPreset'); g.add(preset);
  const pw = name => preset.widgets.find(x => x.name === name);
  out.preset_default = {steps: pw('steps')._displayValue, gamma: pw('gamma')._displayValue};
  pw('steps').value = 6; pw('gamma').value = 0.5;
  out.preset_set = {steps: pw('steps')._displayValue, gamma: pw('gamma')._displayValue};
  const settings = LiteGraph.createNode('FewStepSettings'); g.add(settings);
  out.settings_gamma = settings.widgets.find(x => x.name === 'gamma')._displayValue;
  out.settings_hidden = settings.widgets.filter(x => !settings.isWidgetVisible(x)).map(x => x.name);
  const p = await window.app.graphToPrompt();
  out.prompt_fuse_seed = p.output[String(fuse.id)]?.inputs?.seed;
  return JSON.stringify(out);
})()""" % {"margins": WIDGET_MARGINS}


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if not exe:
        reason = "chromium is not installed (apt-get install -y chromium); frontend tests skipped"
        print(reason)
        pytest.skip(reason)
    b = Browser(exe, window=L.WINDOW).start()
    yield b
    b.stop()


def load_js(wf_text: str, name: str = "") -> str:
    """Load a workflow as the frontend opens a file (restoring its saved view); ``name`` titles its tab."""
    tab = json.dumps(name) if name else "undefined"
    return f"(async () => {{ await window.app.loadGraphData({wf_text}, true, true, {tab}); return true; }})()"


# Screenshots without the frame-rate overlay (it changes from run to run).
SETTINGS_JS = """(async () => {
  const s = window.app.extensionManager?.setting ?? null;
  if (s?.set) await s.set('Comfy.Graph.CanvasInfo', false);
  else await window.app.ui.settings.setSettingValueAsync('Comfy.Graph.CanvasInfo', false);
  return true;
})()"""


@pytest.fixture(scope="module")
def frontend_results(browser, server):
    scripts = ["JSON.stringify({title: document.title, version: window.__COMFYUI_FRONTEND_VERSION__ ?? null, "
               "nodeDefs: Object.keys(LiteGraph.registered_node_types).filter(k => k.startsWith('FewStep'))})"]
    scripts.append(SETTINGS_JS)
    for name in NAMES:
        wf = W.ui_path(name).read_text()
        scripts += [load_js(wf, name), VIEW_JS, Screenshot(), PROMPT_JS]
    for name in OLD_NAMES:
        scripts += [load_js((OLD / f"{name}.json").read_text()), PROMPT_JS]
    scripts.append(NEW_NODES_JS)
    values, logs = browser.run(server.url + "/", scripts, ready_js=READY, timeout=180)
    page, rest = json.loads(values[0]), values[2:]
    results, views = {}, {}
    SHOTS.joinpath("small").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(NAMES):
        _, view, png, prompt = rest[4 * i: 4 * i + 4]
        views[name], results[name] = json.loads(view), json.loads(prompt)
        (SHOTS / f"{name}.png").write_bytes(png)
        (SHOTS / "small" / f"{name}.png").write_bytes(small_png(png))
    old = {name: json.loads(rest[4 * len(NAMES) + 2 * i + 1]) for i, name in enumerate(OLD_NAMES)}
    (SHOTS / "views.json").write_text(json.dumps({"views": views, "new_nodes": json.loads(rest[-1]),
                                                   "console": logs[-50:]}, indent=1))
    return page, results, logs, views, json.loads(rest[-1]), old


def small_png(png: bytes, width: int = 960, colors: int = 96) -> bytes:
    """A README-sized copy: scaled to `width` px and quantised to a palette (about 100 KB)."""
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    buf = io.BytesIO()
    img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_frontend_is_served_and_registers_the_pack(frontend_results, server):
    page = frontend_results[0]
    ours = {k for k in server.get("/object_info") if k.startswith("FewStep")}
    assert ours and ours <= set(page["nodeDefs"]), sorted(ours - set(page["nodeDefs"]))


@pytest.mark.parametrize("name", NAMES)
def test_frontend_graph_to_prompt_equals_api_workflow(name, frontend_results, server):
    _, results, logs = frontend_results[:3]
    got = {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in results[name]["output"].items()}
    api = W.strip_meta(json.loads((W.API_DIR / f"{name}.json").read_text()))
    assert got == api, f"{name}: the frontend sends a different prompt; console: {logs[-10:]}"
    ui = json.loads(W.ui_path(name).read_text())
    assert W.ui_to_api(ui, server.get("/object_info")) == got


@pytest.mark.parametrize("name", NAMES)
def test_frontend_resave_keeps_links_and_widgets(name, frontend_results):
    results = frontend_results[1]
    saved = results[name]["workflow"]
    ours = json.loads(W.ui_path(name).read_text())
    assert saved["links"] == ours["links"]
    fe = {n["id"]: n for n in saved["nodes"]}
    for n in ours["nodes"]:
        assert fe[n["id"]]["widgets_values"] == n["widgets_values"], n["type"]
        assert fe[n["id"]]["inputs"] == n["inputs"], n["type"]
        assert fe[n["id"]]["outputs"] == n["outputs"], n["type"]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_readable(name, frontend_results):
    """Zero missing nodes; the saved view opens at a zoom where text is drawn; every node (title bar included) is in
    the window and none overlaps another after the frontend sized them; no label or value is cut."""
    view = frontend_results[3][name]
    assert view["missing"] == [], f"{name}: missing node types {view['missing']}"
    assert view["window"] == list(L.WINDOW)
    assert view["scale"] >= L.MIN_TEXT_SCALE and not view["lowQuality"], (
        f"{name} opens at {view['scale']:.2f}, where the frontend draws no text")
    (w, h), (left, top, right, bottom) = L.WINDOW, L.MARGIN  # the margins are under the menus and tool bars
    off = [r for r in view["rects"] if r["x0"] < left - 2 or r["y0"] < top - 2 or r["x1"] > w - right + 2
           or r["y1"] > h - bottom + 2]
    assert not off, f"{name}: nodes outside the {w}x{h} window's free area at opening: {off}"
    rects = view["rects"]
    overlaps = [(a["type"], b["type"]) for i, a in enumerate(rects) for b in rects[i + 1:]
                if a["x0"] < b["x1"] and b["x0"] < a["x1"] and a["y0"] < b["y1"] and b["y0"] < a["y1"]]
    assert not overlaps, f"{name}: overlapping nodes {overlaps}"
    assert not view["cut"], f"{name}: widgets whose label and value do not fit:\n" + "\n".join(view["cut"])
    assert view["groups"] >= 1 and any(r["type"] == "Note" for r in rects), f"{name}: no titled groups or note"
    assert (SHOTS / f"{name}.png").stat().st_size > 10_000


def test_technical_options_are_advanced_and_hidden(frontend_results):
    views = frontend_results[3]
    hidden = {x for v in views.values() for x in v["hiddenAdvanced"]}
    # The pack hides its own nodes' advanced widgets (web/js/fewstep.js); core's nodes keep the frontend's behaviour.
    shown = [x for v in views.values() for x in v["shownAdvanced"] if x.startswith("FewStep")]
    assert not shown, f"advanced widgets drawn by default: {shown}"
    for node in ("FewStepSamplerTCD", "FewStepSamplerPCM", "FewStepSettings"):
        assert {f"{node}.{w}" for w in ("final_step", "noise_device", "batch_offset", "fused")} <= hidden, node


def test_new_fuse_node_shows_dare_inputs_only_for_dare(frontend_results):
    new = frontend_results[4]
    lin, dare = new["fuse_linear"], new["fuse_dare"]
    assert lin == {"seed": False, "control": [False], "drop_p": False, "density": False,
                   "seed_control_value": "fixed"}, lin
    assert dare == {"seed": True, "control": [True], "drop_p": True, "density": False}, dare
    assert new["prompt_fuse_seed"] == 0  # hidden or shown, the value is still sent
    assert new["fuse_cut"] == [], f"a new fuse node at its default width cuts {new['fuse_cut']}"


def test_from_preset_values_are_drawn_as_words(frontend_results):
    new = frontend_results[4]
    assert new["preset_default"] == {"steps": "from preset", "gamma": "from preset"}, new
    assert new["preset_set"]["steps"] == "6" and new["preset_set"]["gamma"].startswith("0.5"), new
    assert new["settings_gamma"] == "from preset"
    assert set(new["settings_hidden"]) == {"final_step", "noise_device", "fused", "batch_offset"}


@pytest.mark.parametrize("name", OLD_NAMES)
def test_old_workflow_files_load_with_their_values(name, frontend_results):
    """A workflow saved before the widgets changed loads in today's frontend and sends the prompt it was saved
    with; re-saving keeps its widget values."""
    got = frontend_results[5][name]
    prompt = {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in got["output"].items()}
    assert prompt == W.strip_meta(json.loads((OLD / "api" / f"{name}.json").read_text()))
    saved = {n["id"]: n["widgets_values"] for n in got["workflow"]["nodes"]}
    for n in json.loads((OLD / f"{name}.json").read_text())["nodes"]:
        assert saved[n["id"]] == n["widgets_values"], n["type"]
