"""The LoRA detector and the sampler preset table speak the same preset names."""
from __future__ import annotations
from fewstep.lora import detect
from fewstep.samplers import presets


def test_every_detected_preset_exists_in_the_sampler_table():
    assert set(detect.PRESET_NAMES) <= set(presets.PRESET_KEYS)


def test_preset_keys_round_trip():
    for p in presets.PRESETS:
        assert presets.get_preset_by_key(presets.preset_key(p.name)) is p
