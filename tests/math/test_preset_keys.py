"""The LoRA detector and the sampler preset table speak one preset vocabulary: ``Preset.name``."""
from __future__ import annotations
from fewstep.lora import detect
from fewstep.samplers import presets


def test_every_detected_preset_exists_in_the_sampler_table():
    assert set(detect.PRESET_NAMES) <= set(presets.PRESET_NAMES)
    for _kind, preset, _base in detect.KNOWN_HASHES.values():
        assert preset is None or preset in presets.PRESET_NAMES
