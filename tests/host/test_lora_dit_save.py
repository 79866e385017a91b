"""Tier b: FewStep Export LoRA and FewStep Save Fused on the DiT families.

Export: the fused deltas of a Wan and a Flux model (row ranges of fused weights, bias / norm / modulation diffs
included) as one kohya-named LoRA by randomized SVD, at a rank that holds them exactly: fused back alone -- by the
fuse and by core's own LoraLoaderModelOnly, which maps every name -- it gives the same weights; the report gives the
relative error. Save: the fused Wan stand-in saved with the host's saver loads back through core's diffusion-model
loader as the same model, with the fused weights.
"""
from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _dit  # noqa: E402
from test_lora_dit_host import _extras_file, current, patched, shapes_of  # noqa: E402

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def L(host):
    from fewstep.nodes import lora
    return lora


@pytest.fixture(scope="module")
def S(host):
    from fewstep.nodes import lora_save
    return lora_save


@pytest.fixture(scope="module")
def loras(host, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("dit-save-loras")
    folder_paths.add_model_folder_path("loras", str(d))
    yield d
    folder_paths.folder_names_and_paths["loras"][0].remove(str(d))


@pytest.mark.parametrize("family,fmt", [("wan", "diffusers"), ("flux", "diffusers")])
def test_export_round_trip_on_dit(L, S, loras, tmp_path, family, fmt, caplog):
    import folder_paths
    import nodes
    from safetensors import safe_open
    m0 = _dit.small_model(family)
    styles = [(f"exp-{family}.safetensors", 0.8)]
    _dit.write_lora(loras / styles[0][0], family, fmt, shapes_of(m0), rank=4)
    if family == "wan":
        _extras_file(loras / "exp-wan-extras.safetensors", m0)
        styles.append(("exp-wan-extras.safetensors", 0.5))
    fused, _, _ = L.fuse(m0, L.NONE, 1.0, styles)
    keys = sorted(fused.patches)
    want = patched(fused, keys)
    path, report = S.export_fused(fused, mode="rank", rank=32, dtype="fp32", output_dir=str(tmp_path),
                                  filename_prefix=f"loras/{family}_export")
    assert "overall relative Frobenius error" in report and path.endswith(".safetensors"), report
    with safe_open(path, "pt") as f:
        names = list(f.keys())
    assert all(n.startswith(("lora_unet_", "diffusion_model.")) for n in names), names[:5]
    if family == "wan":
        assert "diffusion_model.blocks.0.modulation.diff" in names  # a non-weight parameter under its own name
    name = os.path.basename(path)
    folder_paths.add_model_folder_path("loras", os.path.dirname(path))
    again, rep2, _ = L.fuse(m0, L.NONE, 1.0, [(name, 1.0)])
    assert sorted(again.patches) == keys, rep2
    with caplog.at_level(logging.WARNING):
        core = nodes.LoraLoaderModelOnly().load_lora_model_only(m0, name, 1.0)[0]
    assert "lora key not loaded" not in caplog.text, caplog.text[-2000:]
    ours, theirs = patched(again, keys), patched(core, keys)
    base = current(m0, keys)
    for k in keys:
        scale = (want[k] - base[k]).abs().max().item() + 1e-12
        assert (ours[k] - want[k]).abs().max().item() <= 1e-4 * scale + 1e-6, k
        assert (theirs[k] - want[k]).abs().max().item() <= 1e-4 * scale + 1e-6, k


def test_save_fused_wan_standin_loads_back(L, S, tmp_path):
    """The fused Wan stand-in (CausVid-shaped + a musubi style LoRA) saved with the host's saver: core's
    diffusion-model loader reads it back as a Wan model with the fused weights (fp16), and the source model stays
    unpatched."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    from tools import standins
    root = standins.ensure(("wan",))
    folder_paths.add_model_folder_path("loras", str(root / "loras"))
    src = root / "diffusion_models" / standins.diffusion_model_name("wan", "t2v")
    model = comfy.sd.load_diffusion_model(str(src))
    fam = standins.family("wan")
    accel = next(f.name for f in fam.loras if f.layout == "causvid")
    style = next(f.name for f in fam.loras if f.layout == "musubi")
    fused, report, preset = L.fuse(model, accel, 1.0, [(style, 0.7)])
    assert preset == "Wan 2.1 CausVid", report
    keys = sorted(fused.patches)
    before = current(model, keys)
    want = {k: v.to(torch.float16) for k, v in patched(fused, keys).items()}
    import comfy.model_management as mm
    try:
        path = S.save_fused(fused, "checkpoints/wan_fused", "fp16", output_dir=str(tmp_path))
    finally:
        mm.unload_all_models()  # the host unpatches the shared model when it unloads it
    back = comfy.sd.load_diffusion_model(path)
    assert type(back.model).__name__ == "WAN21"
    for k in keys:
        assert torch.equal(comfy.utils.get_attr(back.model, k).to(torch.float16), want[k]), k
    assert all(torch.equal(v, before[k]) for k, v in current(model, keys).items())
