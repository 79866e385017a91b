"""API-format prompts <-> UI-format (LiteGraph, version 0.4) workflows, as the ComfyUI frontend reads/writes them.

* ``api_to_ui(prompt, object_info, name)``: the graph-editor workflow for an API prompt. Widget values go to
  ``widgets_values`` in object_info order, with the frontend's extra values: "fixed" after an INT that gets a
  "control after generate" widget (``control_after_generate`` or the names seed/noise_seed), "fixed" and ""
  after a COMBO with ``control_after_generate``, and "image" after an ``image_upload``/``video_upload`` COMBO.
  Socket inputs come first in ``inputs``; a widget input fed by a link is appended after them with
  ``widget: {name}`` (the layout the frontend saves). A node's ``_meta.title`` becomes its title. Nodes are laid out
  in titled groups with a Note saying what to load where, and the saved view opens at a zoom where text is drawn
  (``tools.workflow_layout``).
* ``ui_to_api(workflow, object_info)``: what the frontend's ``graphToPrompt`` sends to ``/prompt``: widget values
  mapped back to input names (skipping the extra values), links to ``[origin_id_str, slot]``; muted nodes (mode 2)
  are dropped, bypassed nodes (mode 4) and Reroutes are passed through, Note/MarkdownNote are ignored and a
  PrimitiveNode's value is written into the widget it feeds.

CLI: ``python -m tools.workflows regenerate`` starts a real server, fetches ``/object_info`` and writes
``workflows/<name>.json`` for every ``workflows/api/<name>.json``. ``python -m tools.workflows check`` compares
instead of writing (exit 1 when a UI workflow is stale).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools import workflow_layout as L

REPO = Path(__file__).resolve().parent.parent
API_DIR = REPO / "workflows" / "api"
UI_DIR = REPO / "workflows"
NOTES_DIR = REPO / "workflows" / "notes"

WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_NEVER, MODE_BYPASS = 2, 4


# ---------------------------------------------------------------- object_info helpers

def note_text(name: str) -> str:
    """Workflow ``name``'s own description (``workflows/notes/<name>.md``; "" when it has none)."""
    return L.description(NOTES_DIR, name).strip()


def _input_specs(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every required/optional input in the node's declared order (hidden ones left out)."""
    inputs = spec.get("input", {})
    order = spec.get("input_order") or {s: list(inputs.get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            if name not in inputs.get(section, {}):
                continue
            raw = inputs[section][name]
            typ = raw[0]
            opts = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
            if isinstance(typ, list):
                opts = {**opts, "options": typ}
                typ = "COMBO"
            out.append((name, typ, opts))
    return out


def _is_widget(typ: str, opts: dict) -> bool:
    return typ in WIDGET_TYPES and not opts.get("forceInput")


def _extra_widget_values(typ: str, name: str, opts: dict) -> list:
    """Values of the frontend's helper widgets that follow the input's own widget in widgets_values."""
    if typ == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
        return ["fixed"]
    if typ == "COMBO":
        extra = []
        if opts.get("control_after_generate"):
            extra += ["fixed", ""]  # control mode, then the control_filter_list string
        if opts.get("image_upload") or opts.get("video_upload"):
            extra.append("image")  # the upload button's value
        return extra
    return []


def _default(typ: str, opts: dict):
    if "default" in opts:
        return opts["default"]
    if typ == "COMBO":
        return (opts.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(typ)


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _spec(object_info: dict, class_type: str) -> dict:
    try:
        return object_info[class_type]
    except KeyError:
        raise ValueError(f"node type {class_type!r} is not in object_info (is its pack installed?)") from None


# ---------------------------------------------------------------- API -> UI

def _node_ids(prompt: dict) -> dict[str, int]:
    keys = list(prompt)
    if all(str(k).isdigit() for k in keys) and len({int(k) for k in keys}) == len(keys):
        return {str(k): int(k) for k in keys}
    return {str(k): i + 1 for i, k in enumerate(keys)}


def _depths(prompt: dict) -> dict[str, int]:
    deps = {str(k): {str(v[0]) for v in n.get("inputs", {}).values() if _is_link(v)} for k, n in prompt.items()}
    depth: dict[str, int] = {}

    def visit(k, stack=()):
        if k in depth:
            return depth[k]
        if k in stack:
            raise ValueError(f"the prompt has a cycle through node {k}")
        d = 0
        for p in deps.get(k, ()):
            if p not in deps:
                raise ValueError(f"node {k} links to missing node {p}")
            d = max(d, visit(p, stack + (k,)) + 1)
        depth[k] = d
        return d

    for k in deps:
        visit(k)
    return depth


def api_to_ui(prompt: dict, object_info: dict, name: str | None = None) -> dict:
    """The UI-format (LiteGraph 0.4) workflow of an API prompt; ``name`` picks its note (``workflows/notes/``)."""
    ids = _node_ids(prompt)
    depth = _depths(prompt)
    # Order = a topological order (by depth, then id), as the frontend's computed execution order.
    keys = sorted(ids, key=lambda k: (depth[k], ids[k]))
    order = {k: i for i, k in enumerate(keys)}

    nodes: dict[str, dict] = {}
    pending_links = []  # (to_key, input_name, from_key, from_slot)
    for k in keys:
        nodes[k] = _ui_node(k, prompt[k], object_info, ids[k], order[k], pending_links)
    links = _link(nodes, pending_links, ids, order)

    specs = {n["type"]: _spec(object_info, n["type"]) for n in nodes.values()}
    ordered = [nodes[k] for k in keys]
    roles = {n["id"]: L.role(n["type"], specs[n["type"]]) for n in ordered}
    text = L.note_text(L.description(NOTES_DIR, name), ordered, specs)
    note = None
    if text:
        note = {"id": max(ids.values(), default=0) + 1, "type": "Note", "pos": [0, 0],
                "size": [L.NOTE_W, L.note_height(text)], "flags": {}, "order": len(nodes), "mode": 0,
                "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text], "color": "#432",
                "bgcolor": "#653", "title": "Read me: what to load where"}
    groups = L.arrange(ordered, roles, note)
    all_nodes = [nodes[k] for k in sorted(nodes, key=lambda k: ids[k])] + ([note] if note else [])
    for n in all_nodes:
        n.pop("_named_values", None)
    return {
        "last_node_id": max(n["id"] for n in all_nodes) if all_nodes else 0,
        "last_link_id": len(links),
        "nodes": all_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": L.view(all_nodes, groups)},
        "version": 0.4,
    }


def _ui_node(k: str, node: dict, object_info: dict, node_id: int, order: int, pending_links: list) -> dict:
    ct = node["class_type"]
    spec = _spec(object_info, ct)
    values = node.get("inputs", {})
    unknown = set(values) - {name for name, _, _ in _input_specs(spec)}
    if unknown:
        raise ValueError(f"node {k} ({ct}) has inputs object_info does not declare: {sorted(unknown)}")
    sockets, linked_widgets, widgets_values = [], [], []
    named, texts, shown = {}, [], 0
    optional = set(spec.get("input", {}).get("optional", {}))
    multiline = False
    for name, typ, opts in _input_specs(spec):
        v = values.get(name)
        if _is_widget(typ, opts):
            multiline |= bool(opts.get("multiline"))
            if _is_link(v):
                linked_widgets.append({"name": name, "type": typ, "widget": {"name": name}, "link": None})
                pending_links.append((k, name, str(v[0]), v[1]))
                v = _default(typ, opts)
            elif name not in values:
                v = _default(typ, opts)
            widgets_values.append(v)
            widgets_values.extend(_extra_widget_values(typ, name, opts))
            named[name] = v
        else:
            # The frontend draws optional sockets hollow and saves that as shape 7 (LiteGraph HollowCircle).
            sockets.append({"name": name, "shape": 7, "type": typ, "link": None} if name in optional
                           else {"name": name, "type": typ, "link": None})
            if v is not None:
                if not _is_link(v):
                    raise ValueError(f"node {k} ({ct}) input {name!r} must be a link, got {v!r}")
                pending_links.append((k, name, str(v[0]), v[1]))
    for name, typ, opts in _input_specs(spec):  # the rows the graph editor draws
        # web/js/fewstep.js hides the advanced widgets of the pack's own nodes; this frontend draws core's.
        hidden = opts.get("advanced") and ct.startswith("FewStep")
        if _is_widget(typ, opts) and not hidden and L.shown(ct, name, named):
            shown += 1 + len(_extra_widget_values(typ, name, opts))
            texts.append((name, "" if opts.get("multiline") else str(named[name])))
    outputs = [{"name": (spec.get("output_name") or spec["output"])[i], "type": t, "links": [], "slot_index": i}
               for i, t in enumerate(spec.get("output", []))]
    size = [L.node_width(texts, multiline), L.node_height(ct, max(len(sockets), len(outputs)), shown, multiline)]
    ui = {"id": node_id, "type": ct, "pos": [0, 0], "size": size, "flags": {}, "order": order, "mode": 0,
          "inputs": sockets + linked_widgets, "outputs": outputs, "properties": {"Node name for S&R": ct},
          "widgets_values": widgets_values, "_named_values": named}
    title = (node.get("_meta") or {}).get("title")
    if title and title != spec.get("display_name", ct):
        ui["title"] = title
    return ui


def _link(nodes: dict[str, dict], pending_links: list, ids: dict[str, int], order: dict[str, int]) -> list:
    """Links numbered in a stable order (by target node order, then target slot), written into the nodes."""
    links = []

    def slot_of(k, name):
        return next(i for i, inp in enumerate(nodes[k]["inputs"]) if inp["name"] == name)

    pending_links.sort(key=lambda t: (order[t[0]], slot_of(t[0], t[1])))
    for link_id, (to_k, name, from_k, from_slot) in enumerate(pending_links, start=1):
        if from_k not in nodes:
            raise ValueError(f"node {to_k} input {name!r} links to missing node {from_k}")
        outs = nodes[from_k]["outputs"]
        if not 0 <= from_slot < len(outs):
            raise ValueError(f"node {to_k} input {name!r} links to output {from_slot} of node {from_k} "
                             f"({nodes[from_k]['type']}), which has {len(outs)} outputs")
        to_slot = slot_of(to_k, name)
        nodes[to_k]["inputs"][to_slot]["link"] = link_id
        outs[from_slot]["links"].append(link_id)
        links.append([link_id, ids[from_k], from_slot, ids[to_k], to_slot, outs[from_slot]["type"]])
    return links


# ---------------------------------------------------------------- UI -> API

def _links_by_id(workflow: dict) -> dict[int, tuple[int, int, int, int, str]]:
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # schema version 1 style
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type"))
        else:
            out[link[0]] = tuple(link[1:6])
    return out


def ui_to_api(workflow: dict, object_info: dict, meta: bool = False) -> dict:
    """The API prompt the frontend's graphToPrompt builds from a UI workflow (``_meta`` titles when ``meta``)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ValueError("workflows with subgraphs are not supported")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links_by_id(workflow)

    def resolve(link_id, seen=()):
        """The (node, slot) a link really comes from, through Reroutes and bypassed nodes; None if nothing."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        origin, slot, _, _, typ = links[link_id]
        src = nodes.get(origin)
        if src is None:
            return None
        if src["type"] == "Reroute":
            ins = src.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, seen + (link_id,))
        if src.get("mode") == MODE_BYPASS:
            ins = src.get("inputs") or []
            candidates = [i for i, inp in enumerate(ins) if inp.get("type") == typ and inp.get("link") is not None]
            if slot in candidates:  # same index first, as the frontend does
                candidates.insert(0, slot)
            for i in candidates:
                r = resolve(ins[i]["link"], seen + (link_id,))
                if r is not None:
                    return r
            return None
        if src.get("mode") == MODE_NEVER:
            return None
        return src, slot

    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n.get("order", 0)):
        ct = node["type"]
        if ct in VIRTUAL_TYPES or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        spec = _spec(object_info, ct)
        specs = _input_specs(spec)
        inputs: dict = {}
        wv = node.get("widgets_values")
        if isinstance(wv, dict):
            inputs.update({name: wv[name] for name, typ, opts in specs if _is_widget(typ, opts) and name in wv})
        else:
            wv = list(wv or [])
            i = 0
            for name, typ, opts in specs:
                if not _is_widget(typ, opts):
                    continue
                if i >= len(wv):
                    break
                inputs[name] = wv[i]
                i += 1 + len(_extra_widget_values(typ, name, opts))
        declared = {name for name, _, _ in specs}
        for inp in node.get("inputs") or []:
            name = inp["name"]
            if inp.get("link") is None or name not in declared:
                continue
            r = resolve(inp["link"])
            if r is None:
                continue
            src, slot = r
            if src["type"] == "PrimitiveNode":
                vals = src.get("widgets_values") or []
                if vals:
                    inputs[name] = vals[0]
                continue
            if src["type"] in VIRTUAL_TYPES:
                continue
            inputs[name] = [str(src["id"]), slot]
        entry = {"inputs": inputs, "class_type": ct}
        if meta:
            entry["_meta"] = {"title": node.get("title") or spec.get("display_name") or ct}
        prompt[str(node["id"])] = entry
    return prompt


# ---------------------------------------------------------------- files and CLI

def strip_meta(prompt: dict) -> dict:
    """An API prompt without its ``_meta`` entries (titles), as the server sees it."""
    return {str(k): {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}


def api_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(API_DIR.glob("*.json"))}


def ui_path(name: str) -> Path:
    return UI_DIR / f"{name}.json"


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2) + "\n"


def fetch_object_info() -> dict:
    from tools import hostenv, standins
    srv = hostenv.Server(standin_dir=standins.ensure(("sd15",)))
    srv.start()
    try:
        return srv.get("/object_info")
    finally:
        srv.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.workflows", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["regenerate", "check"])
    ap.add_argument("--object-info", type=Path, help="read object_info from this JSON file instead of a server")
    args = ap.parse_args(argv)
    info = json.loads(args.object_info.read_text()) if args.object_info else fetch_object_info()
    stale = []
    for name, prompt in api_workflows().items():
        text = dumps(api_to_ui(prompt, info, name))
        path = ui_path(name)
        if args.command == "regenerate":
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote {path.relative_to(REPO)}")
            else:
                print(f"unchanged {path.relative_to(REPO)}")
        elif not path.exists() or path.read_text() != text:
            stale.append(name)
    if stale:
        print("stale UI workflows (run `python -m tools.workflows regenerate`): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
