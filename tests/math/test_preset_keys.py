"""The LoRA detector and the sampler preset table speak one preset vocabulary: ``Preset.name``."""
from __future__ import annotations

import pytest

from fewstep.lora import detect
from fewstep.samplers import presets


def test_every_detected_unet_preset_exists_in_the_sampler_table():
    assert set(detect.PRESET_NAMES - detect.FLOW_PRESET_NAMES) <= set(presets.PRESET_NAMES)
    for _kind, preset, _base in detect.KNOWN_HASHES.values():
        assert preset is None or preset in presets.PRESET_NAMES or preset in detect.FLOW_PRESET_NAMES


def test_every_detected_flow_preset_exists_in_the_sampler_table():
    """The DiT releases' presets (and DMD2 / Flash / Turbo) come with the flow-matching presets; where the table has
    any of them it must have every one detection reports."""
    have = detect.FLOW_PRESET_NAMES & set(presets.PRESET_NAMES)
    if not have:
        pytest.skip("this checkout's preset table has no flow-matching presets yet (they arrive with the "
                    "flow-matching samplers); the names detection reports are the agreed Preset.name strings")
    assert detect.FLOW_PRESET_NAMES <= set(presets.PRESET_NAMES), sorted(detect.FLOW_PRESET_NAMES - have)
