// fewstep graph-editor touches. Nothing here changes what a node saves or sends: widget values and their order stay
// as the server declares them, so saved workflows load unchanged.
//  * FewStep LoRA Fuse shows density / drop_p / seed only for the merge modes that use them, and a new node's DARE
//    seed control starts on "fixed" (a randomized seed would make every run fuse anew).
//  * The "take it from the preset" values of FewStep Preset (steps 0, gamma below 0) and FewStep Settings (gamma
//    below 0) are drawn as "from preset".
import { app } from "../../scripts/app.js";

const MERGE_INPUTS = { density: ["ties"], drop_p: ["dare", "dare_ties"], seed: ["dare", "dare_ties"] };
const FROM_PRESET = {
  FewStepPreset: { steps: (v) => v <= 0, gamma: (v) => v < 0 },
  FewStepSettings: { gamma: (v) => v < 0 },
};
const FROM_PRESET_LABEL = "from preset";

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function showMergeInputs(node) {
  const mode = widget(node, "merge_mode")?.value;
  let changed = false;
  for (const [name, modes] of Object.entries(MERGE_INPUTS)) {
    const w = widget(node, name);
    if (!w) continue;
    const hidden = !modes.includes(mode);
    for (const x of [w, ...(w.linkedWidgets ?? [])]) {
      changed ||= !!x.hidden !== hidden;
      x.hidden = hidden;
    }
  }
  if (changed && node.computeSize) {
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
    showMergeInputs(node);
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

app.registerExtension({
  name: "fewstep.widgets",
  nodeCreated(node) {
    const type = node.comfyClass;
    if (type === "FewStepLoraFuse") setUpFuse(node);
    if (FROM_PRESET[type]) labelFromPreset(node, FROM_PRESET[type]);
  },
});
