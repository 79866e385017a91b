"""In-process host: every pack node checks its own inputs where they are entered, from its own schema.

The host's own ``/prompt`` check passes NaN/Inf floats and never compares a V3 dropdown value with its options; each
node's ``validate_inputs`` (called by the host at ``/prompt``) and the start of its ``execute`` do. The end-to-end
side (HTTP 400s on a real server) is ``tests/e2e/test_hostile_inputs_e2e.py``.
"""
from __future__ import annotations

import asyncio
import math

import pytest

BAD_FLOATS = (float("nan"), float("inf"), float("-inf"))


@pytest.fixture(scope="module")
def node_classes(host):
    from fewstep.nodes import FewStepExtension
    return asyncio.run(FewStepExtension().get_node_list())


@pytest.fixture(scope="module")
def V(host):
    from fewstep.nodes import validate
    return validate


def schema_of(cls):
    return cls.define_schema()


def widget_inputs(cls, kind):
    return [i for i in schema_of(cls).inputs if type(i) is kind]


def refused(cls, values) -> str:
    with pytest.raises(ValueError) as e:
        cls.validate_inputs(**values)
    return str(e.value)


def test_every_pack_node_validates_its_inputs(node_classes):
    from comfy_api.internal import first_real_override
    assert len(node_classes) >= 16
    for cls in node_classes:
        assert getattr(cls, "fewstep_validated", False), f"{cls.__name__} has no @validated"
        # the host calls it only when it is a real override of ComfyNode.validate_inputs
        assert first_real_override(cls, "validate_inputs") is not None, cls.__name__


def test_defaults_pass(node_classes):
    """Every widget's own default is accepted (a validator that refuses everything would pass the other tests)."""
    for cls in node_classes:
        values = {i.id: i.default for i in schema_of(cls).inputs if getattr(i, "default", None) is not None}
        assert cls.validate_inputs(**values) is True, cls.__name__


def test_floats_nan_inf_and_range_refused_naming_node_input_and_range(node_classes):
    from comfy_api.v0_0_2 import io
    n = 0
    for cls in node_classes:
        display = schema_of(cls).display_name
        for inp in widget_inputs(cls, io.Float.Input):
            cases = list(BAD_FLOATS)
            cases += [inp.min - 1.0] if inp.min is not None else []
            cases += [inp.max + 1.0] if inp.max is not None else []
            for bad in cases:
                msg = refused(cls, {inp.id: bad})
                assert msg.startswith(f"{display}: {inp.id} is ") and "finite number" in msg, msg
                if inp.min is not None and inp.max is not None:
                    assert f"[{inp.min:g}, {inp.max:g}]" in msg, msg
                n += 1
            assert cls.validate_inputs(**{inp.id: inp.min if inp.min is not None else 0.0}) is True
    assert n >= 60  # LoRA Fuse alone has 8 float widgets


def test_ints_out_of_range_refused(node_classes):
    from comfy_api.v0_0_2 import io
    n = 0
    for cls in node_classes:
        display = schema_of(cls).display_name
        for inp in widget_inputs(cls, io.Int.Input):
            for bad in ([inp.min - 1] if inp.min is not None else []) + ([inp.max + 1] if inp.max is not None else []):
                msg = refused(cls, {inp.id: bad})
                assert msg.startswith(f"{display}: {inp.id} is {bad}; it must be an integer in"), msg
                n += 1
            msg = refused(cls, {inp.id: "12"})
            assert "must be an integer" in msg
    assert n >= 10


def test_combo_values_checked_against_their_options(node_classes):
    """Each option passes; anything else is refused with the allowed values listed (the host skips V3 combos)."""
    from comfy_api.v0_0_2 import io
    n = 0
    for cls in node_classes:
        display = schema_of(cls).display_name
        for inp in widget_inputs(cls, io.Combo.Input):
            for ok in inp.options:
                assert cls.validate_inputs(**{inp.id: ok}) is True
            for bad in ("abc", "", " " + str(inp.options[0]), 7):
                msg = refused(cls, {inp.id: bad})
                assert msg.startswith(f"{display}: {inp.id} is {bad!r}; it must be one of"), msg
                if len(", ".join(map(repr, inp.options))) <= 1200:
                    assert all(repr(o) in msg for o in inp.options), msg
                n += 1
    assert n >= 60


def test_listed_cases_name_the_node_that_holds_the_value(node_classes):
    by_id = {schema_of(c).node_id: c for c in node_classes}
    nan = float("nan")
    cases = [("FewStepLoraFuse", {"accel_strength": nan}, "FewStep LoRA Fuse: accel_strength"),
             ("FewStepLoraFuse", {"lines_beta": nan}, "FewStep LoRA Fuse: lines_beta"),
             ("FewStepScheduleTCD", {"original_steps": "7"}, "FewStep TCD Schedule: original_steps is '7'"),
             ("FewStepScheduleLCM", {"original_steps": "1000"}, "FewStep LCM Schedule: original_steps is '1000'"),
             ("FewStepScheduleLCM", {"original_steps": "abc"}, "FewStep LCM Schedule: original_steps is 'abc'"),
             ("FewStepSettings", {"noise_device": "cuda:7"}, "FewStep Settings (KSampler): noise_device"),
             ("FewStepSettings", {"final_step": "x1"}, "FewStep Settings (KSampler): final_step"),
             ("FewStepSettings", {"fused": "yes"}, "FewStep Settings (KSampler): fused"),
             ("FewStepPreset", {"gamma": nan}, "FewStep Preset: gamma is nan"),
             ("FewStepExportLora", {"filename_prefix": ""}, "FewStep Export LoRA: filename_prefix is empty"),
             ("FewStepSaveFused", {"filename_prefix": ""}, "FewStep Save Fused: filename_prefix is empty")]
    for node_id, values, start in cases:
        msg = refused(by_id[node_id], values)
        assert msg.startswith(start), msg
        assert "one of" in msg or "finite number" in msg or "filename_prefix" in msg


def test_long_option_lists_are_cut(V):
    from comfy_api.v0_0_2 import io

    class Many(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="ManyOptions", display_name="Many", inputs=[
                io.Combo.Input("lora", options=[f"file-{i:05}.safetensors" for i in range(5000)])])

        @classmethod
        def execute(cls, lora):
            return io.NodeOutput()
    V.validated(Many)
    msg = refused(Many, {"lora": "nope"})
    assert "one of its 5000 options ('file-00000.safetensors', " in msg and len(msg) < 1300, len(msg)
    assert Many.validate_inputs(lora="file-04999.safetensors") is True


def test_long_text_refused_and_cut(node_classes, V):
    from comfy_api.v0_0_2 import io
    huge = "8" * 1_000_000
    for cls in node_classes:
        for inp in widget_inputs(cls, io.String.Input):
            msg = refused(cls, {inp.id: huge})
            assert f"{inp.id} is 1000000 characters long" in msg and len(msg) < 300, msg[:400]


def test_timesteps_checked_at_prompt_with_the_bad_item_cut(node_classes):
    cls = next(c for c in node_classes if schema_of(c).node_id == "FewStepScheduleFixed")
    assert cls.validate_inputs(timesteps="999, 499") is True
    msg = refused(cls, {"timesteps": "800, " + "x" * 5000})
    assert msg.startswith("FewStep Fixed Timesteps: timesteps must be integers") and len(msg) < 200, msg
    assert "strictly descending; 400 is followed by 800" in refused(cls, {"timesteps": "400, 800"})


def test_linked_values_are_checked_when_the_node_runs(node_classes):
    """A value that arrives through a link is unknown at /prompt (None there); execute checks it before any work."""
    by_id = {schema_of(c).node_id: c for c in node_classes}
    assert by_id["FewStepPreset"].validate_inputs(model=None, preset=None, gamma=None) is True
    with pytest.raises(ValueError, match=r"^FewStep Preset: gamma is nan"):
        by_id["FewStepPreset"].execute(model=object(), preset="LCM-LoRA", steps=0, strength=1.0, gamma=math.nan)
    with pytest.raises(ValueError, match=r"^FewStep TCD Sampler: noise_device is 'tpu'"):
        by_id["FewStepSamplerTCD"].execute(gamma=0.3, final_step="x0", noise_device="tpu", batch_offset=0, fused="auto")
    with pytest.raises(ValueError, match=r"^FewStep LoRA Stack: strength is inf"):  # positional arguments too
        by_id["FewStepLoraStack"].execute("none", math.inf)
    out = by_id["FewStepSamplerTCD"].execute(gamma=0.3, final_step="x0", noise_device="cpu", batch_offset=0,
                                              fused="off")
    assert out.result[0] is not None


@pytest.mark.parametrize("prefix", ["", "   ", ".", "..", "../x", "a/../../x", "/etc/x", "\\x", ".hidden", "a/.b/c",
                                    "loras/", "x\0y", "n" * 300])
def test_bad_prefixes_refused(V, tmp_path, prefix):
    with pytest.raises(ValueError, match="filename_prefix"):
        V.check_prefix(prefix, str(tmp_path))


@pytest.mark.parametrize("prefix", ["fewstep_export", "loras/fewstep_export", "a b/c.d", "%year%/x", "./x", "a/./b"])
def test_good_prefixes_pass(V, tmp_path, prefix):
    V.check_prefix(prefix, str(tmp_path))


def test_save_and_export_check_the_prefix_before_any_work(host, tmp_path):
    """The prefix is refused before the model is touched (here: a model that would fail any work)."""
    from fewstep.nodes import lora_save
    with pytest.raises(ValueError, match="^FewStep Export LoRA: filename_prefix is empty"):
        lora_save.export_fused(None, filename_prefix="", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="^FewStep Save Fused: filename_prefix '../x' leaves the output folder"):
        lora_save.save_fused(None, "../x", "fp16", output_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_checked_messages_are_bounded(host):
    from fewstep.nodes.common import MAX_MESSAGE, checked

    def fails():
        raise ValueError("key '" + "k" * 100_000 + "' is bad")
    with pytest.raises(ValueError) as e:
        checked("FewStep LoRA Fuse", fails)
    msg = str(e.value)
    full = len("FewStep LoRA Fuse: key '") + 100_000 + len("' is bad")
    assert msg.startswith("FewStep LoRA Fuse: key 'kkk") and msg.endswith(f"... ({full} characters)")
    assert len(msg) < MAX_MESSAGE + 40


def test_save_fused_shows_what_it_wrote(host, tmp_path):
    """FewStep Save Fused's UI output (also in /history) names the file relative to the output folder, and its size,
    as the host's own save nodes show what they wrote."""
    import folder_paths
    from fewstep.nodes import lora_save
    from tools import lorafuzz
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        node = lora_save.FewStepSaveFused.PREPARE_CLASS_CLONE({})  # as the host runs it: hidden inputs set
        out = node.execute(model=lorafuzz.tiny_model(), filename_prefix="checkpoints/tiny", dtype="fp16")
    finally:
        folder_paths.set_output_directory(old)
    path = tmp_path / "checkpoints" / "tiny_00001_.safetensors"
    size = path.stat().st_size
    assert out.result[0] == str(path) and size > 1_000_000
    assert out.ui["text"] == [f"FewStep Save Fused: wrote checkpoints/tiny_00001_.safetensors in the output folder "
                              f"({size / 2 ** 20:.1f} MiB, {size} bytes)"]
