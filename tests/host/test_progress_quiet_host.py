"""Tier b: long LoRA work advances the host's progress bar (comfy.utils.ProgressBar, which the server forwards to
the running node), and a fuse or an export logs one INFO line (the full report goes to the node's UI output and
to DEBUG); an ordinary style LoRA is not reported as "not a recognised acceleration LoRA"."""
from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.host

ACCEL, STYLE = "lcm-lora-sd15-standin.safetensors", "style-sd15-kohya.safetensors"


@pytest.fixture(scope="module")
def fused(host, standin_dir):
    import comfy.sd
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(standin_dir / "loras"))
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"))[:3]
    return model, clip, vae


@pytest.fixture
def progress():
    import comfy.utils
    calls = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(old)


def info_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fewstep" and r.levelno == logging.INFO]


def test_fuse_logs_one_line_and_patching_advances_the_bar(fused, progress, caplog):
    from fewstep.nodes import lora as L
    model = fused[0]
    with caplog.at_level(logging.DEBUG, logger="fewstep"):
        m, report, preset = L.fuse(model, ACCEL, 1.0, [(STYLE, 0.8)])
    lines = info_lines(caplog)
    assert len(lines) == 1 and "\n" not in lines[0] and "LCM" in lines[0], lines
    assert any(r.levelno == logging.DEBUG and r.getMessage() == report for r in caplog.records)
    assert "not a recognised acceleration LoRA" not in report and "[style]" in report
    n_patches = len(m.patches)
    progress.clear()
    import comfy.model_management as mm
    mm.load_models_gpu([m], force_patch_weights=True)  # the host patches every fused weight: one tick each
    try:
        ours = [c for c in progress if c[1] == n_patches]
        assert [v for v, _ in ours] == list(range(1, n_patches + 1)), progress[:5]
    finally:
        m.unpatch_model()
        mm.unload_all_models()


def test_export_advances_the_bar_per_weight_and_logs_one_line(fused, progress, caplog, tmp_path):
    from fewstep.nodes import lora as L
    from fewstep.nodes.lora_save import FewStepExportLora, export_fused
    m, _, _ = L.fuse(fused[0], ACCEL, 1.0, [(STYLE, 0.8)])
    progress.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fewstep"):
        path, report = export_fused(m, rank=4, output_dir=str(tmp_path))
    n = len(m.patches)
    assert progress and progress[-1] == (n, n) and [v for v, _ in progress] == list(range(1, n + 1))
    lines = info_lines(caplog)
    assert len(lines) == 1 and path in lines[0], lines
    assert FewStepExportLora.define_schema().is_output_node


def test_save_fused_advances_the_bar(fused, progress, tmp_path):
    from fewstep.nodes import lora as L
    from fewstep.nodes.lora_save import save_fused
    m, _, _ = L.fuse(fused[0], ACCEL, 1.0, [(STYLE, 0.8)])
    progress.clear()
    path = save_fused(m, "fused", "fp16", output_dir=str(tmp_path))
    totals = {t for _, t in progress}
    n_patches = len(m.patches)
    assert n_patches in totals, "the patch pass at load advances the bar"
    big = max(totals)  # the tensors written: every tensor of the checkpoint
    assert big > n_patches and (big, big) in progress
    assert path.endswith(".safetensors")
    import comfy.model_management as mm
    mm.unload_all_models()
