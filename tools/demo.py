"""`make demo`: run every workflows/api/*.json on a real headless ComfyUI, images to out/, print a table; the README's
plots (tools/docs_plots.py) go to out/ too.

Uses the stand-in SD1.5 checkpoint (at 128 px, the stand-in only has to be fast), or CHECKPOINT=/path/to/real.safetensors
(SD1.5 or SDXL, at 512 / 1024 px).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from tools import hostenv, standins
from tools.checkpoints import detect_base
from tools.hostenv import HostError
from tools.standin_prompts import family_of, on_standins

REPO = Path(__file__).resolve().parent.parent
IMAGE_OUTPUTS = ("SaveImage", "PreviewImage")
WARM_UP = "fewstep_lcm_ksampler"  # a cheap workflow to load the checkpoint with


def prepare(prompt: dict, ckpt_name: str, base: str, size: int) -> dict:
    for node in prompt.values():
        ins = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            ins["ckpt_name"] = ckpt_name
        elif node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            ins["width"] = ins["height"] = size
        for key, value in ins.items():  # LoRA files: the stand-ins (or files) of the checkpoint's base
            if key != "ckpt_name" and isinstance(value, str) and value.endswith(".safetensors"):
                ins[key] = value.replace("sd15", base).replace("sdxl", base)
    return prompt


def steps_of(prompt: dict):
    """Sampling steps of a workflow: a 'steps'/'phases' widget, else the chosen preset's own step count ("-" for a
    workflow that does not sample, such as Save Fused + Export LoRA)."""
    from tools import packroot
    packroot.import_pack()
    from fewstep.samplers import presets
    for node in prompt.values():
        ins = node["inputs"]
        for key in ("steps", "phases"):
            if isinstance(ins.get(key), int) and ins[key] > 0:
                return ins[key]
    for node in prompt.values():
        name = node["inputs"].get("preset")
        if isinstance(name, str) and name in presets.PRESET_NAMES:
            return presets.get_preset(name).steps
    return "-"


def main() -> int:
    ckpt_env = os.environ.get("CHECKPOINT")
    try:
        if ckpt_env:
            ckpt = Path(ckpt_env).expanduser().resolve()
            base = detect_base(ckpt)
            ckpt_name, size = ckpt.name, int(os.environ.get("SIZE", 512 if base == "sd15" else 1024))
        else:
            ckpt, base = None, "sd15"
            ckpt_name, size = standins.checkpoint_name("sd15"), int(os.environ.get("SIZE", 128))
        out = REPO / "out"
        out.mkdir(exist_ok=True)
        workflows = sorted((REPO / "workflows" / "api").glob("*.json"))
        # The flow-family workflows name real files: they run on the flow stand-ins, their text encoders replaced
        # by the test-only conditioning node (tools/standin_prompts.py), whatever CHECKPOINT says.
        flow = {wf for wf in workflows if family_of(json.loads(wf.read_text())) is not None}
        sd = [wf for wf in workflows if wf not in flow]
        if not sd:
            raise HostError("no SD workflows in workflows/api/")
        standin_dir = standins.ensure((base, *(standins.FLOW_FAMILIES if flow else ())))
        rows = []
        with hostenv.Server(output_dir=out / ".comfy", standin_dir=standin_dir, extra_checkpoint=ckpt,
                            test_nodes=bool(flow)) as srv:
            # Warm-up (checkpoint load, first-call set-up) is not charged to the first workflow in the table.
            warm = next((w for w in sd if w.stem == WARM_UP), sd[0])
            srv.run(prepare(json.loads(warm.read_text()), ckpt_name, base, 64))
            for wf in workflows:
                prompt = json.loads(wf.read_text())
                prompt = on_standins(prompt)[0] if wf in flow else prepare(prompt, ckpt_name, base, size)
                steps = steps_of(prompt)
                t0 = time.perf_counter()
                entry = srv.run(prompt)
                dt = time.perf_counter() - t0
                err = hostenv.error_message(entry)
                images = srv.images(entry)
                for i, img in enumerate(images):
                    shutil.copy(img, out / f"{wf.stem}{'_' + str(i) if i else ''}{img.suffix}")
                # A workflow that writes files (Save Fused, Export LoRA) instead of images succeeds without images.
                ok = not err and (images or not any(n["class_type"] in IMAGE_OUTPUTS for n in prompt.values()))
                rows.append((wf.stem, steps, dt / max(1, len(images)), "ok" if ok else f"FAILED {err or 'no image'}"))
    except HostError as e:
        print(f"make demo: {e}", file=sys.stderr)
        return 2
    print(f"\n{'workflow':40s} {'steps':>5s} {'s/image':>8s}  result   (checkpoint {ckpt_name}, {size}px)")
    for name, steps, sec, res in rows:
        print(f"{name:40s} {str(steps):>5s} {sec:8.2f}  {res}")
    if ckpt is None:
        print("The stand-in checkpoint has the real SD1.5 architecture with seeded random weights: its images are noise\n"
              "by design; the table shows that every workflow runs end to end. For real images run it on your own\n"
              "checkpoint: CHECKPOINT=/path/to/model.safetensors make demo (SD1.5 at 512 px, SDXL at 1024 px).")
    print(f"\nimages in {out}/")
    write_plots(out)
    return 0 if all(r[3] == "ok" for r in rows) else 1


def write_plots(out: Path) -> None:
    """The README's plots (schedules, Gaussian error), made here beside the images; skipped without matplotlib."""
    from tools import docs_plots
    if docs_plots.main([str(out)]) != 0:
        print("plots skipped (see above)")


if __name__ == "__main__":
    sys.exit(main())
