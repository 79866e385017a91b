"""Host tier: the values of workflow files saved before the widgets changed (tests/fixtures/old_workflows/) mean
what they meant: FewStep Preset's steps 0 and gamma -1 (drawn as "from preset" now) run the preset's."""
from __future__ import annotations

import json
from pathlib import Path

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "old_workflows"


def old_api(name):
    return json.loads((OLD / "api" / f"{name}.json").read_text())


def test_old_sentinel_values_run_as_the_preset(host, standin_dir):
    """Old FewStep Preset values (steps 0, gamma -1) give the preset's steps and gamma, as they did."""
    import comfy.sd
    from fewstep.nodes.presets import FewStepPreset
    from fewstep.samplers import presets
    (node,) = [n for n in old_api("fewstep_preset_hypersd").values() if n["class_type"] == "FewStepPreset"]
    vals = node["inputs"]
    assert (vals["steps"], vals["gamma"]) == (0, -1.0)
    model = comfy.sd.load_checkpoint_guess_config(str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"),
                                                  output_vae=False, output_clip=False)[0]
    for preset in ("TCD", vals["preset"]):
        out = FewStepPreset.execute(model, preset, vals["steps"], vals["strength"], vals["gamma"])
        p = presets.get_preset(preset)
        assert len(out[1]) == p.steps + 1
        if p.sampler == "tcd":
            assert out[0].extra_options["gamma"] == p.gamma
