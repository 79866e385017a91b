"""How a UI workflow is laid out so that it reads at first sight in a 1600x1000 window.

* Every node gets a role (model and LoRAs, prompt, latent, sampling, output) from its type and category; the roles
  become titled groups, arranged in columns left to right in the order the work flows:
  ``[load] [prompt, latent] [sampling] [output]``. A group taller than ``MAX_COLUMN`` wraps into sub-columns.
* A Note node opens the first column: the workflow's own description (``workflows/notes/<name>.md``, optional) and
  which file each loader widget wants, and from which models folder.
* ``extra.ds`` (the frontend's saved view: scale and offset) fits the whole graph into ``WINDOW`` at a scale where the
  frontend draws text (it stops drawing text below 8 px / 14 px = 0.57 at its default settings).

Sizes follow the frontend's own measures (LiteGraph: title 30, slot rows 20, widget rows 24); the pack's own widgets
marked ``advanced`` are hidden until asked for (web/js/fewstep.js), so they take no room; core's advanced widgets
(CLIPLoader's ``device``) are drawn by this frontend and counted.
"""
from __future__ import annotations

from pathlib import Path

WINDOW = (1600, 1000)
MARGIN = (64, 124, 24, 40)  # left (side bar), top (banner, tabs, run bar), right, bottom of the window kept free
MIN_TEXT_SCALE = 0.6      # lowest opening zoom (the frontend draws text from 8/14 = 0.571 on)
TITLE_H, SLOT_H, WIDGET_H = 30, 20, 24
GROUP_PAD, GROUP_TITLE_H = 12, 36
NODE_GAP, COLUMN_GAP = 16, 36
MAX_COLUMN = 1100
MIN_W, MAX_W, CHAR_W = 300, 520, 7.0

ROLES = ("load", "prompt", "latent", "sample", "output")
TITLES = {"load": "Model and LoRAs", "prompt": "Prompt", "latent": "Latent (size, frames, image)",
          "sample": "Sampling", "output": "Decode and save"}
COLORS = {"load": "#3f789e", "prompt": "#8A8", "latent": "#a1309b", "sample": "#b58b2a", "output": "#88A"}
COLUMNS = (("load",), ("prompt", "latent"), ("sample",), ("output",))
NOTE_W = 420

# Loader widgets -> the models folder their file comes from.
FILE_FOLDERS = {"ckpt_name": "models/checkpoints", "lora_name": "models/loras", "accel_lora": "models/loras",
                "unet_name": "models/diffusion_models", "vae_name": "models/vae", "clip_name": "models/text_encoders",
                "clip_name1": "models/text_encoders", "clip_name2": "models/text_encoders",
                "image": "input (or the node's upload button)"}
FILE_PREFIXES = {"style_lora_": "models/loras"}


def role(class_type: str, spec: dict) -> str:
    """Which group a node belongs in."""
    cat = spec.get("category", "")
    if class_type.startswith("VAEDecode") or spec.get("output_node") or cat.startswith("advanced/model_merging"):
        return "output"
    if cat.startswith(("loaders", "advanced/model")) or class_type.startswith("ModelSampling"):
        return "load"
    if cat.startswith("conditioning"):
        return "prompt"
    if cat.startswith(("latent", "image")) or class_type.startswith(("VAEEncode", "LoadImage")):
        return "latent"
    return "sample"


def node_width(widget_texts: list[tuple[str, str]], multiline: bool) -> float:
    """Wide enough for each widget's label and value side by side (a long file name in a combo, say)."""
    longest = max((len(label) + len(value) for label, value in widget_texts), default=0)
    width = max(MIN_W, min(MAX_W, 100 + CHAR_W * longest))
    return float(round(max(width, 400 if multiline else 0)))


# Widgets the pack's graph-editor extension (web/js/fewstep.js) shows only for some values of another widget:
# node type -> controlling widget -> {widget: values it is shown for}.
SHOWN_FOR = {"FewStepLoraFuse": {"merge_mode": {"density": ("ties",), "drop_p": ("dare", "dare_ties"),
                                                "seed": ("dare", "dare_ties")}}}


def shown(class_type: str, name: str, values: dict) -> bool:
    """Whether the graph editor draws widget ``name`` given the node's widget ``values``."""
    for control, rules in SHOWN_FOR.get(class_type, {}).items():
        if name in rules and values.get(control) not in rules[name]:
            return False
    return True


# Nodes the frontend draws taller than their widgets (an image preview).
EXTRA_HEIGHT = {"LoadImage": 270}


def node_height(class_type: str, n_slots: int, n_widgets: int, multiline: bool) -> float:
    """LiteGraph's computeSize: slot rows, visible widget rows, 8 + 6 padding (a multiline text box ~110 more)."""
    return float(SLOT_H * max(1, n_slots) + WIDGET_H * n_widgets + (110 if multiline else 0) + 14
                 + EXTRA_HEIGHT.get(class_type, 0))


def file_lines(nodes: list[dict], specs: dict[str, dict], named: str = "") -> list[str]:
    """'what to load where' for every loader widget in the graph (value 'none' left out, and files the text
    ``named`` already names: a workflow's own description that says where its real files come from)."""
    lines = []
    for n in nodes:
        for name, value in n.get("_named_values", {}).items():
            folder = FILE_FOLDERS.get(name) or next((f for p, f in FILE_PREFIXES.items() if name.startswith(p)), None)
            if folder and isinstance(value, str) and value not in ("", "none") and value not in named:
                title = n.get("title") or specs[n["type"]].get("display_name") or n["type"]
                lines.append(f"- {title} · {name}: {value}  →  {folder}/")
    return lines


def note_text(description: str, nodes: list[dict], specs: dict[str, dict]) -> str:
    parts = [description.strip()] if description.strip() else []
    files = file_lines(nodes, specs, description)
    if files:
        parts.append("Files (the names here are the test stand-ins; pick your own):\n" + "\n".join(files))
    return "\n\n".join(parts)


def note_height(text: str) -> float:
    rows = sum(max(1, -(-len(line) // 58)) for line in text.splitlines())
    return float(40 + 17 * rows)


def _stack(items: list[dict], x: float, y: float) -> tuple[float, float]:
    """Nodes top to bottom from (x, y) (their title bars included), wrapping at MAX_COLUMN; returns the block's
    (width, height)."""
    col_x, col_y, col_w, width, height = x, y, 0.0, 0.0, 0.0
    for n in items:
        h = n["size"][1] + TITLE_H
        if col_y > y and col_y - y + h > MAX_COLUMN:
            col_x += col_w + NODE_GAP
            col_y, col_w = y, 0.0
        n["pos"] = [col_x, col_y + TITLE_H]
        col_y += h + NODE_GAP
        col_w = max(col_w, n["size"][0])
        width = max(width, col_x + col_w - x)
        height = max(height, col_y - NODE_GAP - y)
    return width, height


def arrange(nodes: list[dict], roles: dict[int, str], note: dict | None) -> list[dict]:
    """Positions for ``nodes`` (in their order) and the titled groups around them; the note opens column one."""
    groups = []
    x = 0.0
    for column in COLUMNS:
        y, col_w = 0.0, 0.0
        if note is not None and column is COLUMNS[0]:
            note["pos"] = [x, y + TITLE_H]
            y += note["size"][1] + TITLE_H + COLUMN_GAP / 2
            col_w = note["size"][0]
        for r in column:
            members = [n for n in nodes if roles[n["id"]] == r]
            if not members:
                continue
            w, h = _stack(members, x + GROUP_PAD, y + GROUP_TITLE_H)
            box = [x, y, w + 2 * GROUP_PAD, h + GROUP_TITLE_H + GROUP_PAD]
            groups.append({"title": TITLES[r], "bounding": box, "color": COLORS[r], "font_size": 24, "flags": {}})
            y += box[3] + COLUMN_GAP / 2
            col_w = max(col_w, box[2])
        if col_w:
            x += col_w + COLUMN_GAP
    return groups


def bounds(nodes: list[dict], groups: list[dict]) -> tuple[float, float, float, float]:
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes] + [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                                 g["bounding"][1] + g["bounding"][3]) for g in groups]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def view(nodes: list[dict], groups: list[dict]) -> dict:
    """``extra.ds``: the scale (at most 1) and offset that fit the graph into WINDOW less MARGIN, centred.

    The frontend draws a graph point p at (p + offset) * scale on the screen."""
    x0, y0, x1, y1 = bounds(nodes, groups)
    left, top, right, bottom = MARGIN
    avail_w, avail_h = WINDOW[0] - left - right, WINDOW[1] - top - bottom
    scale = min(1.0, avail_w / (x1 - x0), avail_h / (y1 - y0))
    scale = int(scale * 100) / 100  # a round zoom
    ox = (left + (avail_w - (x1 - x0) * scale) / 2) / scale - x0
    oy = (top + (avail_h - (y1 - y0) * scale) / 2) / scale - y0
    return {"scale": scale, "offset": [round(ox, 1), round(oy, 1)]}


def description(notes_dir: Path, name: str | None) -> str:
    if name is None:
        return ""
    path = notes_dir / f"{name}.md"
    return path.read_text() if path.is_file() else ""
