// fewstep graph-editor touches. Nothing here changes what a node saves or sends: widget values and their order stay
// as the server declares them, so saved workflows load unchanged.
//  * FewStep LoRA Fuse shows density / drop_p / seed only for the merge modes that use them, and a new node's DARE
//    seed control starts on "fixed" (a randomized seed would make every run fuse anew).
//  * Widgets the server marks advanced (the samplers' technical options) are hidden until "Show Advanced".
//  * The "take it from the preset" values of FewStep Preset (steps 0, gamma below 0) and FewStep Settings (gamma
//    below 0) are drawn as "from preset".
import { app } from "../../../scripts/app.js"; // served as /extensions/fewstep/js/fewstep.js

const MERGE_INPUTS = { density: ["ties"], drop_p: ["dare", "dare_ties"], seed: ["dare", "dare_ties"] };
const FROM_PRESET = {
  FewStepPreset: { steps: (v) => v <= 0, gamma: (v) => v < 0 },
  FewStepSettings: { gamma: (v) => v < 0 },
};
const FROM_PRESET_LABEL = "from preset";

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// This frontend skips hidden widgets when it draws a node and sizes it, but still lays them out one row each;
// a hidden widget measures zero rows here, so it leaves no gap.
function collapseWhenHidden(node, w) {
  if (w.fewstepCollapses) return;
  w.fewstepCollapses = true;
  const own = w.computeSize;
  w.computeSize = function (width) {
    if (!node.isWidgetVisible(w)) return [0, -4];
    return own ? own.call(this, width) : [width ?? node.size[0], LiteGraph.NODE_WIDGET_HEIGHT];
  };
}

function showMergeInputs(node, fit = false) {
  const mode = widget(node, "merge_mode")?.value;
  let changed = false;
  for (const [name, modes] of Object.entries(MERGE_INPUTS)) {
    const w = widget(node, name);
    if (!w) continue;
    const hidden = !modes.includes(mode);
    for (const x of [w, ...(w.linkedWidgets ?? [])]) {
      collapseWhenHidden(node, x);
      changed ||= !!x.hidden !== hidden;
      x.hidden = hidden;
    }
  }
  if ((changed || fit) && node.computeSize) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

function setUpFuse(node) {
  const seedControl = widget(node, "seed")?.linkedWidgets?.[0];
  if (seedControl) seedControl.value = "fixed"; // a loaded workflow's own value replaces this in configure()
  const mode = widget(node, "merge_mode");
  if (mode) {
    const callback = mode.callback;
    mode.callback = function (...args) {
      const r = callback?.apply(this, args);
      showMergeInputs(node);
      return r;
    };
  }
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const r = onConfigure?.apply(this, args);
    showMergeInputs(node, true); // the saved size may hold rows for inputs hidden now
    return r;
  };
  showMergeInputs(node);
}

function labelFromPreset(node, rules) {
  for (const [name, isFromPreset] of Object.entries(rules)) {
    const w = widget(node, name);
    if (!w) continue;
    const base = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(w), "_displayValue")
      ?? Object.getOwnPropertyDescriptor(Object.getPrototypeOf(Object.getPrototypeOf(w)), "_displayValue");
    Object.defineProperty(w, "_displayValue", {
      configurable: true,
      get() {
        if (!this.computedDisabled && isFromPreset(Number(this.value))) return FROM_PRESET_LABEL;
        return base?.get ? base.get.call(this) : String(this.value);
      },
    });
  }
}

// This frontend copies an input's "advanced" flag into widget.options, while its visibility check, its size and its
// "Show Advanced" menu read widget.advanced: set that too, so the frontend's own mechanism applies.
function markAdvanced(node) {
  for (const w of node.widgets ?? []) {
    if (!w.options?.advanced) continue;
    w.advanced = true;
    collapseWhenHidden(node, w);
  }
  if (!node.widgets?.some((w) => w.advanced)) return;
  const fit = () => node.setSize([node.size[0], node.computeSize()[1]]);
  fit();
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const r = onConfigure?.apply(this, args);
    fit(); // a saved size may predate the hidden widgets
    return r;
  };
}

app.registerExtension({
  name: "fewstep.widgets",
  nodeCreated(node) {
    const type = node.comfyClass;
    if (type?.startsWith("FewStep")) markAdvanced(node);
    if (type === "FewStepLoraFuse") setUpFuse(node);
    if (FROM_PRESET[type]) labelFromPreset(node, FROM_PRESET[type]);
  },
});
