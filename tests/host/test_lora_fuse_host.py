"""In-process host: FewStep LoRA Fuse / Export against the real ComfyUI host, in-process, on the SD1.5 stand-in."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

CKPT = "fewstep-standin-sd15.safetensors"
LCM = "lcm-lora-sd15-standin.safetensors"
KOHYA = "style-sd15-kohya.safetensors"
PEFT = "style-sd15-peft.safetensors"
# A spread of keys: resnet conv, time embedding, proj_in, attention q/k/out, ff, up/down samplers.
PROBE = [
    "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "diffusion_model.time_embed.0.weight",
    "diffusion_model.input_blocks.1.1.proj_in.weight",
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight",
    "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight",
    "diffusion_model.output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight",
    "diffusion_model.output_blocks.8.0.skip_connection.weight",
]
ATTN_PROBE = [k for k in PROBE if ".attn" in k]


@pytest.fixture(scope="module")
def L(host, standin_dir):
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(standin_dir / "loras"))
    from fewstep.nodes import lora
    return lora


@pytest.fixture(scope="module")
def S(L):
    """The save/export side of the LoRA nodes."""
    from fewstep.nodes import lora_save
    return lora_save


@pytest.fixture(scope="module")
def model(L, standin_dir):
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(str(standin_dir / "checkpoints" / CKPT))[0]


@pytest.fixture()
def loras_tmp(L, tmp_path):
    import folder_paths
    d = tmp_path / "loras"
    d.mkdir()
    folder_paths.add_model_folder_path("loras", str(d))
    yield d
    folder_paths.folder_names_and_paths["loras"][0].remove(str(d))


def weights(m, keys):
    """Patched values of `keys` (host patch code: fp32 add, one rounding), then unpatch."""
    import comfy.utils
    try:
        for k in keys:
            m.patch_weight_to_device(k)
        return {k: comfy.utils.get_attr(m.model, k).detach().clone() for k in keys}
    finally:
        m.unpatch_model()


def base(model, keys):
    import comfy.utils
    return {k: comfy.utils.get_attr(model.model, k).detach().clone() for k in keys}


def delta_of(m, key):
    """The fp32 delta the fuse's lazy patch adds to `key` (computed on demand, as the host does when patching)."""
    return m.patches[key][-1][1].compute(device=None)


def assert_close_to(a, b, ref, what):
    for k in a:
        scale = (ref[k] - a[k]).abs().max().item() + ref[k].abs().max().item()
        err = (a[k].double() - b[k].double()).abs().max().item()
        assert err <= 4e-6 * scale, f"{what}: {k} differs by {err} (scale {scale})"


def core_chain(model, names_strengths):
    import nodes
    m = model
    for name, s in names_strengths:
        m = nodes.LoraLoaderModelOnly().load_lora_model_only(m, name, s)[0]
    return m


def test_fuse_equals_core_chained_loraloader(L, model):
    m, report, preset = L.fuse(model, LCM, 1.0, [(KOHYA, 0.8)])
    assert preset == "LCM-LoRA" and "LCM-LoRA" in report
    assert "matched 278/278" in report or "unmatched 0" in report, report
    core = core_chain(model, [(LCM, 1.0), (KOHYA, 0.8)])
    ref = base(model, PROBE)
    ours, theirs = weights(m, PROBE), weights(core, PROBE)
    for k in PROBE:
        assert not torch.equal(ours[k], ref[k]), f"{k} not patched"
    assert_close_to(ours, theirs, ref, "fewstep vs core LoraLoaderModelOnly x2")
    assert not model.patches, "the input model was modified"
    assert all(torch.equal(v, ref[k]) for k, v in base(model, PROBE).items()), "base weights not restored"


def test_peft_keys_applied_where_core_drops_them(L, model, caplog):
    mp, rep, _ = L.fuse(model, L.NONE, 1.0, [(PEFT, 1.0)])
    mk, _, _ = L.fuse(model, L.NONE, 1.0, [(KOHYA, 1.0)])
    assert "matched 128/128" in rep, rep
    assert set(mp.patches) == set(mk.patches) and len(mp.patches) == 128
    for k in mk.patches:
        assert torch.equal(delta_of(mp, k), delta_of(mk, k)), k
    # Core ComfyUI: the PEFT attention keys (unet.*.to_q.lora_A) are not loaded -- the gap we close.
    with caplog.at_level(logging.WARNING):
        core = core_chain(model, [(PEFT, 1.0)])
    dropped = "lora key not loaded" in caplog.text
    ref = base(model, ATTN_PROBE)
    unchanged = all(torch.equal(v, ref[k]) for k, v in weights(core, ATTN_PROBE).items())
    assert dropped or unchanged, "core ComfyUI now loads PEFT attention keys; update the docs"
    assert any(not torch.equal(v, ref[k]) for k, v in weights(mp, ATTN_PROBE).items())


def test_unpatch_bit_identical_over_20_runs(L, model):
    keys = ATTN_PROBE
    ref = base(model, keys)
    m1, _, _ = L.fuse(model, L.NONE, 1.0, [(KOHYA, 1.0)])
    m2, _, _ = L.fuse(model, L.NONE, 1.0, [("style-sd15-dora.safetensors", 0.7), (KOHYA, -0.5)])
    seen = []
    for i in range(20):
        m = (m1, m2)[i % 2]
        w = weights(m, keys)
        assert all(not torch.equal(w[k], ref[k]) for k in keys), f"run {i}: not patched"
        seen.append(w)
        now = base(model, keys)
        assert all(torch.equal(now[k], ref[k]) for k in keys), f"run {i}: base not bit-identical after unpatch"
        assert not model.backup, "backup left behind"
    for i in range(2, 20):
        assert all(torch.equal(seen[i][k], seen[i - 2][k]) for k in keys), f"run {i}: fused weights not repeatable"


@pytest.mark.parametrize("name", ["style-sd15-loha.safetensors", "style-sd15-lokr.safetensors"])
def test_lycoris_fuse_like_core(L, model, name):
    m, rep, _ = L.fuse(model, L.NONE, 1.0, [(name, 0.9)])
    assert len(m.patches) == 128, rep
    assert all(".attn" in k for k in m.patches)
    ref = base(model, ATTN_PROBE)
    ours = weights(m, ATTN_PROBE)
    assert all(not torch.equal(ours[k], ref[k]) for k in ATTN_PROBE)
    untouched = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert untouched not in m.patches
    theirs = weights(core_chain(model, [(name, 0.9)]), ATTN_PROBE)
    assert_close_to(ours, theirs, ref, f"{name} vs core")


def test_dora_out_axis_follows_lycoris_where_core_uses_the_base_norm(L, model, standin_dir):
    """The stand-in DoRA file's dora_scale is [out, 1] (LyCORIS' default since 2025): the fused weight is LyCORIS'
    merged weight W + s·(m·W'/‖W'‖ − W) with W' = W + ΔW normalised per output row, within one rounding; core
    ComfyUI 0.3.75 normalises the base weight W there and lands a few percent of the delta away."""
    from safetensors.torch import load_file
    name = "style-sd15-dora.safetensors"
    sd = load_file(str(standin_dir / "loras" / name))
    m, rep, _ = L.fuse(model, L.NONE, 1.0, [(name, 0.9)])
    ref = base(model, ATTN_PROBE)
    ours = weights(m, ATTN_PROBE)
    theirs = weights(core_chain(model, [(name, 0.9)]), ATTN_PROBE)
    facts = L.HostFacts("test", model)
    modules = {k.split(".lora_down")[0] for k in sd if ".lora_down" in k}
    for k in ATTN_PROBE:
        mod = next(x for x in modules if facts.mapper.lookup(x) == k)
        down, up = sd[mod + ".lora_down.weight"].double(), sd[mod + ".lora_up.weight"].double()
        alpha, mag = float(sd[mod + ".alpha"]), sd[mod + ".dora_scale"].double()
        w = ref[k].double()
        merged = w + alpha / down.shape[0] * (up @ down)
        d = merged * mag / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
        exact = w + 0.9 * (d - w)
        ulp = torch.finfo(ours[k].dtype).eps * exact.abs().clamp(min=2 ** -14)
        assert ((ours[k].double() - exact).abs() <= ulp).all(), k
        delta = (exact - w).abs().max().item()
        assert (theirs[k].double() - exact).abs().max().item() > 0.01 * delta, f"core now follows LyCORIS: {k}"


def test_block_weights_zero_block_untouched(L, model):
    vec = ["1"] * 17
    vec[1] = "0"  # IN01 (SD1.5 17-slot: BASE, IN01, IN02, IN04, ...)
    m, rep, _ = L.fuse(model, L.NONE, 1.0, [(KOHYA, 1.0)], block_weights=",".join(vec))
    in01 = [k for k in model.model.state_dict() if k.startswith("diffusion_model.input_blocks.1.") and ".attn" in k
            and k.endswith(".weight")]
    assert in01 and not any(k in m.patches for k in in01)
    assert len(m.patches) == 128 - 8
    probe = [in01[0], "diffusion_model.input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"]
    ref, w = base(model, probe), weights(m, probe)
    assert torch.equal(w[probe[0]], ref[probe[0]]) and not torch.equal(w[probe[1]], ref[probe[1]])
    with pytest.raises(ValueError, match="FewStep LoRA Fuse"):
        L.fuse(model, L.NONE, 1.0, [(KOHYA, 1.0)], block_weights="1,0,1")


@pytest.fixture()
def small_styles(loras_tmp, standin_dir):
    """The kohya and LoHa style files cut to the 8 modules of down_blocks.0.attentions.0 (fast merges)."""
    from safetensors.torch import load_file
    for src, dst in ((KOHYA, "small-kohya.safetensors"), ("style-sd15-loha.safetensors", "small-loha.safetensors")):
        sd = load_file(str(standin_dir / "loras" / src))
        _write(loras_tmp / dst, {k: v for k, v in sd.items() if "down_blocks_0_attentions_0_" in k})
    return [("small-kohya.safetensors", 1.0), ("small-loha.safetensors", 1.0)]


@pytest.mark.parametrize("mode", ["ties", "dare", "dare_ties"])
def test_merge_modes_deterministic(L, model, mode, small_styles):
    styles = small_styles
    a, rep, _ = L.fuse(model, L.NONE, 1.0, styles, merge_mode=mode, seed=3, density=0.3, drop_p=0.5)
    b, _, _ = L.fuse(model, L.NONE, 1.0, styles, merge_mode=mode, seed=3, density=0.3, drop_p=0.5)
    lin, _, _ = L.fuse(model, L.NONE, 1.0, styles)
    k = ATTN_PROBE[0]
    assert mode in rep
    assert all(torch.equal(delta_of(a, key), delta_of(b, key)) for key in a.patches)
    assert not torch.equal(delta_of(a, k), delta_of(lin, k))
    if mode != "ties":
        c, _, _ = L.fuse(model, L.NONE, 1.0, styles, merge_mode=mode, seed=4, density=0.3, drop_p=0.5)
        assert not torch.equal(delta_of(a, k), delta_of(c, k))


def test_svd_export_refuses_within_reported_error(L, S, model, loras_tmp, tmp_path, small_styles):
    import re
    m, _, _ = L.fuse(model, L.NONE, 1.0, small_styles)
    path, report = S.export_fused(m, rank=8, dtype="fp32", output_dir=str(tmp_path / "out"))
    overall = float(re.search(r"overall relative Frobenius error: ([\d.]+)%", report).group(1)) / 100
    assert 0 < overall < 1 and report.count("  r=8 ") == 8, report
    shutil.copy(path, loras_tmp / "exported.safetensors")
    e, rep2, _ = L.fuse(model, L.NONE, 1.0, [("exported.safetensors", 1.0)])
    assert "matched 8/8" in rep2, rep2
    num = den = 0.0
    for k in m.patches:
        d, r = delta_of(m, k).double(), delta_of(e, k).double()
        num += (d - r).pow(2).sum().item()
        den += d.pow(2).sum().item()
    got = (num / den) ** 0.5
    assert abs(got - overall) <= 1e-3 * max(overall, 1e-3) + 1e-5, (got, overall)
    # energy mode reaches its threshold
    _, rep3 = S.export_fused(m, mode="energy", energy=0.999, rank=64, output_dir=str(tmp_path / "out"))
    assert float(re.search(r"error: ([\d.]+)%", rep3).group(1)) <= (1 - 0.999 ** 2) ** 0.5 * 100 + 0.1


def test_save_and_export_refuse_a_disk_too_small_and_keep_no_partial_file(L, S, model, small_styles, tmp_path,
                                                                          monkeypatch):
    """A disk that cannot hold the file is refused before writing, naming the node and the file; a write that fails
    half-way (disk full) leaves no partial file and names the node, not a bare SafetensorError."""
    import collections

    import comfy.model_management
    import comfy.utils
    m, _, _ = L.fuse(model, L.NONE, 1.0, small_styles)
    ref = base(model, PROBE)
    out = tmp_path / "out"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(1, 1, 4096))
    with pytest.raises(ValueError, match=r"FewStep Save Fused: fused_00001_\.safetensors needs [\d.]+ GiB, but the "
                                         r"disk of .* has 0\.00 GiB free"):
        S.save_fused(m, "fused", "fp16", output_dir=str(out))
    with pytest.raises(ValueError, match=r"FewStep Export LoRA: .*needs .* GiB"):
        S.export_fused(m, rank=4, output_dir=str(out))
    assert not list(out.rglob("*.safetensors"))
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    def half_then_full(sd, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(comfy.utils, "save_torch_file", half_then_full)
    try:
        with pytest.raises(ValueError, match=r"FewStep Save Fused: writing fused_00001_\.safetensors to .* failed, "
                                             r"nothing was kept: \[Errno 28\] No space left on device"):
            S.save_fused(m, "fused", "fp16", output_dir=str(out))
    finally:
        comfy.model_management.unload_all_models()  # the host unpatches the shared model when it unloads it
    assert not list(out.rglob("*.safetensors"))
    after = base(model, PROBE)
    assert all(torch.equal(ref[k], after[k]) for k in PROBE), "the model was left patched"


def test_export_needs_fused_model(L, S, model, tmp_path):
    with pytest.raises(ValueError, match="FewStep Export LoRA: the model carries no weight patches; connect the "
                                         "MODEL output of FewStep LoRA Fuse"):
        S.export_fused(model, output_dir=str(tmp_path))


def test_fuse_composes_with_core_loaders_and_itself(L, S, model):
    """A core LoraLoaderModelOnly before or after the fuse, and two fuses in a row, give the core chain's weights;
    the input models stay unpatched and unpatching is bit-exact."""
    from fewstep.nodes.lora_host import fuse_records
    ref = base(model, PROBE)
    want = weights(core_chain(model, [(LCM, 1.0), (KOHYA, 0.8)]), PROBE)
    core_lcm = core_chain(model, [(LCM, 1.0)])
    fused_lcm, _, _ = L.fuse(model, LCM, 1.0, [])
    n_lcm = len(fused_lcm.patches)
    chains = {"core then fuse": L.fuse(core_lcm, L.NONE, 1.0, [(KOHYA, 0.8)])[0],
              "fuse then core": core_chain(fused_lcm, [(KOHYA, 0.8)]),
              "fuse then fuse": L.fuse(fused_lcm, L.NONE, 1.0, [(KOHYA, 0.8)])[0]}
    for what, m in chains.items():
        got = weights(m, PROBE)
        assert_close_to(got, want, ref, what)
        assert all(torch.equal(v, ref[k]) for k, v in base(model, PROBE).items()), f"{what}: base not restored"
    assert len(fused_lcm.patches) == n_lcm and all(len(ps) == 1 for ps in fused_lcm.patches.values())
    assert not model.patches
    assert len(fuse_records(chains["fuse then fuse"])) == 2
    assert fuse_records(chains["core then fuse"])[0].adapters[0].name == KOHYA
    # What an export would see: only the keys with a core patch are "foreign".
    kohya_keys = set(chains["fuse then fuse"].patches) - {k for k, ps in chains["fuse then fuse"].patches.items()
                                                          if len(ps) == 1}
    assert kohya_keys and set(S.foreign_patched_keys(chains["fuse then core"])) == kohya_keys
    assert S.foreign_patched_keys(chains["fuse then fuse"]) == []


def test_export_holds_core_loader_patches_too(L, S, model, loras_tmp, tmp_path, small_styles, standin_dir):
    """Fuse, then a core LoRA loader on the same model: the export is the model's whole change (before, a core
    LoRA after the fuse was silently left out), exact where only the fuse patched, the host's result elsewhere."""
    import re
    sd = {k: v for k, v in _kohya(standin_dir).items()
          if "up_blocks_3_attentions_2_" in k or "down_blocks_0_attentions_0_transformer_blocks_0_attn1_" in k}
    _write(loras_tmp / "small-core.safetensors", sd)
    fused, _, _ = L.fuse(model, L.NONE, 1.0, small_styles)
    m = core_chain(fused, [("small-core.safetensors", 0.5)])
    foreign = S.foreign_patched_keys(m)
    assert len(fused.patches) == 8 and len(m.patches) == 16 and len(foreign) == 12, (len(m.patches), foreign)
    keys = sorted(m.patches)
    ref = base(model, keys)
    applied = weights(m, keys)
    deltas = dict(S.fused_deltas(S.EXPORT, m))
    assert sorted(deltas) == keys
    for k in keys:
        want = applied[k].double() - ref[k].double()
        assert want.abs().max() > 0, k
        err = (deltas[k].double() - want).abs().max().item()
        assert err <= 4e-6 * (ref[k].abs().max().item() + want.abs().max().item()), (k, err)
        if k not in foreign:  # the fuse-only keys stay the fuse's exact fp32 delta
            assert torch.equal(deltas[k], delta_of(fused, k)), k
    path, report = S.export_fused(m, rank=8, dtype="fp32", output_dir=str(tmp_path / "out"))
    assert "12 weights also carry patches from other nodes" in report, report
    assert re.search(r"16 weights exported", report), report
    shutil.copy(path, loras_tmp / "exported-all.safetensors")
    _, rep2, _ = L.fuse(model, L.NONE, 1.0, [("exported-all.safetensors", 1.0)])
    assert "matched 16/16" in rep2, rep2


# ---------------------------------------------------------------- bad input: errors name the file (and key)

def _write(path, sd, meta=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)


def _kohya(standin_dir):
    from safetensors.torch import load_file
    return load_file(str(standin_dir / "loras" / KOHYA))


def test_sdxl_lora_on_sd15_names_file_and_base(L, model, loras_tmp):
    from tools import standins
    standins.build_lora("sdxl", "kohya_diffusers", "attn", 8, 4.0, loras_tmp / "xl-style.safetensors")
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*xl-style\.safetensors was made for SDXL"):
        L.fuse(model, L.NONE, 1.0, [("xl-style.safetensors", 1.0)])


def test_truncated_file(L, model, loras_tmp, standin_dir):
    data = (standin_dir / "loras" / KOHYA).read_bytes()
    (loras_tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*cut\.safetensors.*(truncated|corrupt)"):
        L.fuse(model, L.NONE, 1.0, [("cut.safetensors", 1.0)])


def test_nan_tensor(L, model, loras_tmp, standin_dir):
    sd = _kohya(standin_dir)
    key = sorted(k for k in sd if k.endswith("lora_up.weight"))[3]
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    _write(loras_tmp / "nan.safetensors", sd)
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*nan\.safetensors") as e:
        L.fuse(model, L.NONE, 1.0, [("nan.safetensors", 1.0)])
    assert key in str(e.value)


def test_pickle_file_refused(L, model, loras_tmp):
    (loras_tmp / "old.ckpt").write_bytes(b"not a pickle we will ever open")
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*old\.ckpt.*safetensors"):
        L.fuse(model, L.NONE, 1.0, [("old.ckpt", 1.0)])


def test_shape_mismatch(L, model, loras_tmp, standin_dir):
    sd = _kohya(standin_dir)
    key = sorted(k for k in sd if k.endswith("attn1_to_q.lora_up.weight"))[0]
    sd[key] = torch.cat([sd[key], sd[key][:1]])  # one output row too many
    _write(loras_tmp / "shape.safetensors", sd)
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*shape\.safetensors") as e:
        L.fuse(model, L.NONE, 1.0, [("shape.safetensors", 1.0)])
    assert key.rsplit(".lora_up", 1)[0] in str(e.value) or "to_q" in str(e.value)


def test_mostly_unmatched_and_missing(L, model, loras_tmp):
    sd = {f"lora_unet_no_such_block_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(3)}
    sd.update({f"lora_unet_no_such_block_{i}.lora_up.weight": torch.zeros(8, 4) for i in range(3)})
    _write(loras_tmp / "alien.safetensors", sd)
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*alien\.safetensors.*match no weight"):
        L.fuse(model, L.NONE, 1.0, [("alien.safetensors", 1.0)], on_unmatched="warn")
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*missing\.safetensors"):
        L.fuse(model, "missing.safetensors", 1.0, [])


def test_lowvram_partial_load_patches_a_cast_copy_every_forward(L, model):
    """Low VRAM / offload: the host leaves the stored weights unpatched and calls the fuse's patch on a cast copy
    at every forward (LowVramPatch). That copy gets exactly the fully patched weight (fp32) or its fp16 rounding,
    the stored weight is never written, and the UNet output matches the fully patched model."""
    import comfy.ops
    import comfy.utils
    m, _, _ = L.fuse(model, LCM, 1.0, [(KOHYA, 0.8)])
    keys = [PROBE[0], PROBE[3], PROBE[7]]  # a 3x3 conv, attention q (accel + style), feed-forward
    ref, full = base(model, keys), weights(m, keys)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([400.0])
    m.patch_model()
    try:
        out_full = m.model.apply_model(x, t, c_crossattn=ctx)
    finally:
        m.unpatch_model()
    m.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # nothing fits: every module deferred
    try:
        for k in keys:
            mod = comfy.utils.get_attr(m.model, k.rsplit(".", 1)[0])
            assert mod.weight_function, f"{k}: the host did not defer the patch (no LowVramPatch)"
            assert torch.equal(mod.weight, ref[k]), f"{k}: stored weight changed under lowvram"
            w32 = comfy.ops.cast_bias_weight(mod, input=torch.zeros(1, dtype=torch.float32))[0]
            assert torch.equal(w32, full[k]), f"{k}: lowvram fp32 weight differs from the full patch"
            w16 = comfy.ops.cast_bias_weight(mod, input=torch.zeros(1, dtype=torch.float16))[0]
            assert w16.dtype == torch.float16
            err = (w16.double() - full[k].double()).abs().max().item()
            assert err <= 4e-3 * full[k].abs().max().item(), f"{k}: lowvram fp16 weight off by {err}"
            assert torch.equal(mod.weight, ref[k]), f"{k}: stored weight written by a forward-time patch"
        out_low = m.model.apply_model(x, t, c_crossattn=ctx)
    finally:
        m.unpatch_model()
    scale = out_full.abs().max().item()
    assert (out_low - out_full).abs().max().item() <= 1e-5 * scale
    after = base(model, keys)
    assert all(torch.equal(after[k], ref[k]) for k in keys), "base weights not restored after lowvram unpatch"
    mod = comfy.utils.get_attr(m.model, keys[0].rsplit(".", 1)[0])
    assert not mod.weight_function, "LowVramPatch left behind after unpatch"


def test_lora_stack_feeds_the_fuse_like_its_widgets(L, model):
    """FewStep LoRA Stack: a chain of stacks gives the fuse exactly what the style widgets give, in order, after the
    widgets; 'none' and strength 0 pass through; a missing file or a foreign value names the node."""
    s1 = L.FewStepLoraStack.execute(KOHYA, 0.8).args[0]
    s2 = L.FewStepLoraStack.execute(L.NONE, 1.0, s1).args[0]  # passes through
    s3 = L.FewStepLoraStack.execute("style-sd15-lokr.safetensors", 0.0, s2).args[0]  # strength 0: skipped
    s4 = L.FewStepLoraStack.execute("style-sd15-loha.safetensors", 0.5, s3).args[0]
    assert s4 == ((KOHYA, 0.8, ""), ("style-sd15-loha.safetensors", 0.5, "")) and s1 == ((KOHYA, 0.8, ""),)
    common = dict(model=model, accel_lora=LCM, accel_strength=1.0, merge_mode="linear", density=0.2, drop_p=0.5,
                  seed=0, block_weights="", lines_alpha=1.0, lines_beta=0.0, on_unmatched="error")
    none = {f"style_{w}_{i}": v for i in (1, 2, 3) for w, v in (("lora", L.NONE), ("strength", 1.0))}
    stacked = L.FewStepLoraFuse.execute(**common, style_stack=s4, **none)
    widgets = L.FewStepLoraFuse.execute(**common, **{**none, "style_lora_1": KOHYA, "style_strength_1": 0.8,
                                                      "style_lora_2": "style-sd15-loha.safetensors",
                                                      "style_strength_2": 0.5})
    ms, mw = stacked.args[0], widgets.args[0]
    assert set(ms.patches) == set(mw.patches) and len(ms.patches) > 200
    for k in ATTN_PROBE + [PROBE[0]]:
        assert torch.equal(delta_of(ms, k), delta_of(mw, k)), k
    report = stacked.args[1]
    assert KOHYA in report and "style-sd15-loha.safetensors" in report and "style-sd15-lokr" not in report
    with pytest.raises(ValueError, match=r"FewStep LoRA Stack: lora_name is 'nope.safetensors'"):
        L.FewStepLoraStack.execute("nope.safetensors", 1.0)
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: style_stack must come from a FewStep LoRA Stack"):
        L.FewStepLoraFuse.execute(**common, style_stack="x", **none)


# ---------------------------------------------------------------- GLoRA, OFT/BOFT, IA3 (LyCORIS, sd-scripts OFT)

def _lycoris_file(loras_tmp, kind, prefix="lora_unet_", alpha=0.0, name=None):
    """A `kind` adapter over every SD1.5 attention projection, seeded, stored in fp16 like trainer output."""
    from tools import standins
    g = torch.Generator().manual_seed(7)
    sd = {}
    for dmod, (_, shape) in standins.unet_lora_targets("sd15", "attn").items():
        m = prefix + dmod.replace(".", "_")
        out, inn = shape[0], shape[1]
        r = lambda *s, sc=0.05: (torch.randn(*s, generator=g) * sc)  # noqa: E731
        if kind == "glora":
            sd |= {f"{m}.a1.weight": r(inn, 4), f"{m}.a2.weight": r(4, inn), f"{m}.b1.weight": r(out, 4),
                   f"{m}.b2.weight": r(4, inn), f"{m}.alpha": torch.tensor(2.0)}
        elif kind == "oft":
            sd |= {f"{m}.oft_blocks": r(out // 8, 8, 8, sc=0.2), f"{m}.alpha": torch.tensor(alpha)}
        elif kind == "boft":
            sd |= {f"{m}.oft_blocks": r(2, out // 8, 8, 8, sc=0.2), f"{m}.alpha": torch.tensor(alpha),
                   f"{m}.rescale": 1 + r(out, 1, sc=0.02)}
        elif kind == "ia3":
            on_input = dmod.endswith(("to_k", "to_v")) and "attn2" in dmod
            sd |= {f"{m}.weight": r(inn if on_input else out, sc=0.3), f"{m}.on_input": torch.tensor(int(on_input))}
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    name = name or f"style-{kind}.safetensors"
    _write(loras_tmp / name, sd)
    return name, sd


@pytest.mark.parametrize("kind, strength", [("glora", 1.0), ("glora", 0.7), ("oft", 1.0), ("boft", 1.0)])
def test_glora_oft_boft_fuse_like_core(L, model, loras_tmp, kind, strength):
    """Core ComfyUI's adapters agree with the trainers where core is right: GLoRA at any strength, OFT/BOFT at
    strength 1 with no norm clamp (core applies the OFT/BOFT strength twice and clamps at alpha, not alpha·out_dim)."""
    name, _ = _lycoris_file(loras_tmp, kind)
    m, rep, _ = L.fuse(model, L.NONE, 1.0, [(name, strength)])
    assert len(m.patches) == 128 and "matched 128/128" in rep, rep
    assert f"128 {kind}" in rep, rep
    ref = base(model, ATTN_PROBE)
    ours = weights(m, ATTN_PROBE)
    assert all(not torch.equal(ours[k], ref[k]) for k in ATTN_PROBE)
    theirs = weights(core_chain(model, [(name, strength)]), ATTN_PROBE)
    assert_close_to(ours, theirs, ref, f"{kind} at {strength} vs core")


def test_sd_scripts_oft_prefix_and_unpatch(L, model, loras_tmp):
    """sd-scripts names OFT modules `oft_unet_*`: mapped like `lora_unet_*`; unpatching restores the base exactly."""
    a, _ = _lycoris_file(loras_tmp, "oft", prefix="oft_unet_", alpha=1e-3, name="oft-sd-scripts.safetensors")
    b, _ = _lycoris_file(loras_tmp, "oft", prefix="lora_unet_", alpha=1e-3, name="oft-lycoris.safetensors")
    ma, rep, _ = L.fuse(model, L.NONE, 1.0, [(a, 1.0)])
    mb, _, _ = L.fuse(model, L.NONE, 1.0, [(b, 1.0)])
    assert "matched 128/128" in rep and set(ma.patches) == set(mb.patches), rep
    for k in ATTN_PROBE:
        assert torch.equal(delta_of(ma, k), delta_of(mb, k)), k
    ref = base(model, ATTN_PROBE)
    for _ in range(3):
        w = weights(ma, ATTN_PROBE)
        assert all(not torch.equal(w[k], ref[k]) for k in ATTN_PROBE)
        assert all(torch.equal(v, ref[k]) for k, v in base(model, ATTN_PROBE).items()), "base not restored"


def test_ia3_applied_where_core_drops_it(L, model, loras_tmp):
    """IA3 (LyCORIS): W' = W ⊙ (1 + s·w). Core ComfyUI 0.3.75 has no IA3 adapter and skips these keys."""
    name, sd = _lycoris_file(loras_tmp, "ia3")
    m, rep, _ = L.fuse(model, L.NONE, 1.0, [(name, 0.5)])
    assert "matched 128/128" in rep and "128 ia3" in rep, rep
    import comfy.lora
    kohya_name = {hk: m for m, hk in comfy.lora.model_lora_keys_unet(model.model, {}).items()
                  if m.startswith("lora_unet_")}
    ref = base(model, ATTN_PROBE)
    for k in ATTN_PROBE:
        mod = kohya_name[k]
        v = sd[f"{mod}.weight"].float()
        w = ref[k].float()
        want = 0.5 * w * (v[None, :] if bool(sd[f"{mod}.on_input"]) else v[:, None])
        assert torch.allclose(delta_of(m, k), want, atol=1e-7 * w.abs().max().item()), k
    core = core_chain(model, [(name, 0.5)])
    assert all(torch.equal(v, ref[k]) for k, v in weights(core, ATTN_PROBE).items()), \
        "core ComfyUI now applies IA3 files; compare against it instead and update the docs"


# ---------------------------------------------------------------- text-encoder parts onto an optional CLIP

@pytest.fixture(scope="module")
def model_clip(L, standin_dir):
    import comfy.sd
    out = comfy.sd.load_checkpoint_guess_config(str(standin_dir / "checkpoints" / CKPT), output_vae=False)
    return out[0], out[1]


@pytest.fixture()
def te_style(loras_tmp, standin_dir):
    """The kohya style stand-in plus kohya text-encoder modules (q/k/v/out and MLP of CLIP layers 0-3)."""
    g = torch.Generator().manual_seed(11)
    sd = dict(_kohya(standin_dir))
    for i in range(4):
        for mod, (o, n) in {"self_attn_q_proj": (768, 768), "self_attn_v_proj": (768, 768),
                            "self_attn_out_proj": (768, 768), "mlp_fc1": (3072, 768), "mlp_fc2": (768, 3072)}.items():
            k = f"lora_te_text_model_encoder_layers_{i}_{mod}"
            sd[f"{k}.lora_down.weight"] = (torch.randn(8, n, generator=g) * 0.05).half()
            sd[f"{k}.lora_up.weight"] = (torch.randn(o, 8, generator=g) * 0.05).half()
            sd[f"{k}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    _write(loras_tmp / "style-te.safetensors", sd)
    return "style-te.safetensors"


def clip_weights(c):
    """Patched CLIP weights (host patch code), then unpatch."""
    return weights(c.patcher, sorted(c.patcher.patches))


def test_text_encoder_parts_applied_to_clip_like_core_loraloader(L, model_clip, te_style):
    import nodes
    model, clip = model_clip
    m, c, rep, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [(te_style, 0.8)])
    assert "text encoder 20/20 modules applied to CLIP (strength 0.8)" in rep, rep
    assert len(c.patcher.patches) == 20 and not clip.patcher.patches, "input CLIP modified or nothing patched"
    core_m, core_c = nodes.LoraLoader().load_lora(model, clip, te_style, 0.8, 0.8)
    ours, theirs = clip_weights(c), clip_weights(core_c)
    assert set(ours) == set(theirs) and len(ours) == 20
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    # The UNet side is the same fuse as without a CLIP.
    m2, rep2, _ = L.fuse(model, L.NONE, 1.0, [(te_style, 0.8)])
    assert set(m.patches) == set(m2.patches) and len(m.patches) == 128
    assert "20 text encoder keys" not in rep2 and "(connect clip to apply them)" in rep2, rep2


def test_text_encoder_strength_follows_base_block_weight(L, model_clip, te_style):
    model, clip = model_clip
    vec = ["1"] * 17
    vec[0] = "0"  # BASE: LoRA-Block-Weight's text-encoder slot
    _, c, rep, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [(te_style, 0.8)], block_weights=",".join(vec))
    assert not c.patcher.patches and "0/20 modules applied to CLIP (strength 0)" in rep, rep
    vec[0] = "0.5"
    _, c, rep, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [(te_style, 0.8)], block_weights=",".join(vec))
    assert len(c.patcher.patches) == 20 and "(strength 0.4)" in rep, rep


def test_text_encoder_nan_names_file_and_key(L, model_clip, loras_tmp, standin_dir):
    model, clip = model_clip
    sd = dict(_kohya(standin_dir))
    k = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    sd[f"{k}.lora_down.weight"] = torch.full((4, 768), float("nan"), dtype=torch.float16)
    sd[f"{k}.lora_up.weight"] = torch.zeros(3072, 4, dtype=torch.float16)
    _write(loras_tmp / "te-nan.safetensors", sd)
    with pytest.raises(ValueError, match=rf"FewStep LoRA Fuse: .*te-nan\.safetensors: tensor '{k}.lora_down.weight' "
                                         r"contains NaN"):
        L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [("te-nan.safetensors", 1.0)])


def test_text_encoder_only_lora_needs_a_clip(L, model_clip, loras_tmp):
    model, clip = model_clip
    g = torch.Generator().manual_seed(3)
    k = "lora_te_text_model_encoder_layers_5_self_attn_k_proj"
    _write(loras_tmp / "te-only.safetensors", {f"{k}.lora_down.weight": torch.randn(4, 768, generator=g).half(),
                                               f"{k}.lora_up.weight": torch.randn(768, 4, generator=g).half()})
    with pytest.raises(ValueError, match=r"te-only\.safetensors: no UNet LoRA modules found .* connect a clip"):
        L.fuse(model, L.NONE, 1.0, [("te-only.safetensors", 1.0)])
    m, c, rep, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [("te-only.safetensors", 1.0)])
    assert not m.patches and len(c.patcher.patches) == 1 and "text encoder 1/1 modules applied" in rep, rep


def test_onetrainer_text_encoder_names_applied_like_kohya(L, model_clip, te_style, loras_tmp):
    """OneTrainer's OMI format (text encoder under clip_l.*, embeddings under bundle_emb.*): the text-encoder part
    lands on the CLIP exactly as the kohya-named file does through core's LoraLoader; core alone does not know the
    clip_l. names."""
    import re
    from safetensors.torch import load_file
    import nodes
    model, clip = model_clip
    sd = load_file(str(loras_tmp / te_style))

    def omi(k):
        m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+?)(\.(?:lora_down\.weight|"
                     r"lora_up\.weight|alpha))$", k)
        return f"clip_l.text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}{m[4]}" if m else k
    omi_sd = {omi(k): v for k, v in sd.items()}
    assert sum(k.startswith("clip_l.") for k in omi_sd) == 60
    omi_sd["bundle_emb.mystyle.clip_l"] = torch.zeros(2, 768, dtype=torch.float16)
    _write(loras_tmp / "style-te-omi.safetensors", omi_sd)
    m, c, rep, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [("style-te-omi.safetensors", 0.8)])
    assert "text encoder 20/20 modules applied to CLIP (strength 0.8)" in rep, rep
    assert "bundled embeddings: 1 tensors, not applied" in rep and "matched 128/128" in rep, rep
    _, core_c = nodes.LoraLoader().load_lora(model, clip, te_style, 0.8, 0.8)
    ours, theirs = clip_weights(c), clip_weights(core_c)
    assert set(ours) == set(theirs) and len(ours) == 20
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    _, core_omi = nodes.LoraLoader().load_lora(model, clip, "style-te-omi.safetensors", 0.8, 0.8)
    assert not core_omi.patcher.patches, "core ComfyUI now reads OneTrainer's clip_l. names; update the docs"


def test_text_encoder_alpha_from_diffusers_header(L, model_clip, loras_tmp):
    """A diffusers-format text-encoder LoRA whose alpha is only in lora_adapter_metadata is scaled by alpha/rank, as
    diffusers does (and as the fuse does on the UNet side): equal to core's LoraLoader on the file with .alpha
    tensors."""
    import json
    import nodes
    model, clip = model_clip
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(2):
        for proj in ("q_proj", "out_proj"):
            mod = f"text_encoder.text_model.encoder.layers.{i}.self_attn.{proj}"
            sd[f"{mod}.lora_A.weight"] = (torch.randn(8, 768, generator=g) * 0.05).half()
            sd[f"{mod}.lora_B.weight"] = (torch.randn(768, 8, generator=g) * 0.05).half()
    _write(loras_tmp / "te-header.safetensors", sd,
           {"lora_adapter_metadata": json.dumps({"text_encoder.r": 8, "text_encoder.lora_alpha": 2})})
    tensors = dict(sd)
    for k in list(sd):
        if k.endswith(".lora_A.weight"):
            tensors[k[:-len(".lora_A.weight")] + ".alpha"] = torch.tensor(2.0)
    _write(loras_tmp / "te-tensor.safetensors", tensors)
    _, c, rep, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [("te-header.safetensors", 1.0)])
    assert "text encoder 4/4 modules applied" in rep, rep
    _, core_c = nodes.LoraLoader().load_lora(model, clip, "te-tensor.safetensors", 1.0, 1.0)
    _, core_hdr = nodes.LoraLoader().load_lora(model, clip, "te-header.safetensors", 1.0, 1.0)
    ours, theirs, header_only = clip_weights(c), clip_weights(core_c), clip_weights(core_hdr)
    assert set(ours) == set(theirs) and len(ours) == 4
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(not torch.equal(ours[k], header_only[k]) for k in ours), "core now reads the header alpha"


def test_lycoris_norm_training_fused_like_core(L, model, loras_tmp):
    """LyCORIS train_norm (<m>.w_norm / <m>.b_norm) changes the norm layers' weight and bias, as core applies it."""
    g = torch.Generator().manual_seed(9)
    sd = {}
    for blk, ch in (("down_blocks_0_attentions_0", 320), ("up_blocks_3_attentions_1", 320),
                    ("mid_block_attentions_0", 1280)):
        m = f"lora_unet_{blk}_norm"
        sd[f"{m}.w_norm"] = (torch.randn(ch, generator=g) * 0.1).half()
        sd[f"{m}.b_norm"] = (torch.randn(ch, generator=g) * 0.1).half()
    _write(loras_tmp / "norm-train.safetensors", sd)
    m, rep, _ = L.fuse(model, L.NONE, 1.0, [("norm-train.safetensors", 0.6)])
    assert len(m.patches) == 6 and "unrecognised tensor names left unused: 0" in rep, rep
    keys = sorted(m.patches)
    assert {k.rsplit(".", 1)[1] for k in keys} == {"weight", "bias"} and all(".norm." in k for k in keys), keys
    ref = base(model, keys)
    ours, theirs = weights(m, keys), weights(core_chain(model, [("norm-train.safetensors", 0.6)]), keys)
    assert all(not torch.equal(ours[k], ref[k]) for k in keys)
    assert_close_to(ours, theirs, ref, "w_norm/b_norm vs core")


def test_fp8_weights_fuse_like_core_with_stochastic_rounding(L, standin_dir):
    """fp8 (e4m3fn) UNet storage: the host rounds the fp32 sum stochastically, seeded by key, on both paths. The fuse
    matches core to within one fp8 step per element, the LoRA is not washed out, and unpatching restores the fp8
    weights bit for bit."""
    import comfy.sd
    m8 = comfy.sd.load_checkpoint_guess_config(str(standin_dir / "checkpoints" / CKPT), output_vae=False,
                                               output_clip=False,
                                               model_options={"dtype": torch.float8_e4m3fn})[0]
    keys = ATTN_PROBE
    ref = base(m8, keys)
    assert all(v.dtype == torch.float8_e4m3fn for v in ref.values())
    m, _, _ = L.fuse(m8, LCM, 1.0, [(KOHYA, 0.8)])
    # As in the host's executor: the fp8 parameters require grad, and the host's fp8 rounding (an out= clamp)
    # refuses autograd tensors, so core and fewstep alike patch fp8 weights only under inference mode.
    with torch.inference_mode():
        ours = weights(m, keys)
        theirs = weights(core_chain(m8, [(LCM, 1.0), (KOHYA, 0.8)]), keys)
    for k in keys:
        a, b = ours[k].float(), theirs[k].float()
        assert not torch.equal(ours[k], ref[k]), f"{k} not patched"
        same = (a == b).float().mean().item()
        assert same > 0.99, f"{k}: only {same:.4f} of fp8 elements equal core's"
        ulp = (torch.maximum(a.abs(), b.abs()) * 2 ** -3).clamp(min=2 ** -9)  # e4m3: 3 mantissa bits
        assert bool(((a - b).abs() <= ulp).all()), k
    # Not washed out: a weak LoRA (delta far below one fp8 step) still lands with gain ~1 along its exact delta,
    # because the rounding is stochastic and unbiased; round-to-nearest would return the base weight (gain ~0).
    weak, _, _ = L.fuse(m8, LCM, 0.05, [])
    with torch.inference_mode():
        got = weights(weak, keys)
    for k in keys:
        d, w = delta_of(weak, k).double(), ref[k].double()
        gain = lambda x: ((x.double() - w) * d).sum().item() / (d * d).sum().item()  # noqa: E731
        rne = (w + d).to(torch.float8_e4m3fn)
        assert gain(rne) < 0.5, f"{k}: the check has no power (delta not below the fp8 step)"
        assert 0.85 < gain(got[k]) < 1.15, f"{k}: LoRA gain {gain(got[k]):.3f} on fp8 (washed out)"
    assert all(torch.equal(v, ref[k]) for k, v in base(m8, keys).items()), "fp8 base not restored bit for bit"


def test_export_includes_text_encoder_from_the_fused_clip(L, S, model_clip, te_style, loras_tmp, tmp_path):
    """With the fuse's clip connected, the export carries lora_te* modules that core loads back onto CLIP; without
    it the report says the text-encoder part was left out."""
    import nodes
    model, clip = model_clip
    m, c, _, _ = L.fuse_model_and_clip(model, clip, L.NONE, 1.0, [(te_style, 0.8)])
    _, rep_no = S.export_fused(m, rank=8, dtype="fp32", output_dir=str(tmp_path / "out"))
    assert "text encoder: NOT exported -- the fused LoRAs have 20 text-encoder modules" in rep_no, rep_no
    path, rep = S.export_fused(m, rank=8, dtype="fp32", output_dir=str(tmp_path / "out"), clip=c)
    assert "text encoder: 20 weights exported from the connected clip" in rep, rep
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        te = {k for k in f.keys() if k.startswith("lora_te_")}
    assert len(te) == 60, sorted(te)[:6]  # 20 modules x (up, down, alpha)
    # Rank-8 TE LoRA exported at rank 8: core's LoraLoader puts it back onto CLIP almost exactly.
    shutil.copy(path, loras_tmp / "exported-te.safetensors")
    _, back = nodes.LoraLoader().load_lora(model, clip, "exported-te.safetensors", 0.0, 1.0)
    ours, theirs = clip_weights(c), clip_weights(back)
    assert set(ours) == set(theirs) and len(ours) == 20
    import comfy.utils
    for k in ours:
        w0 = ours[k].float()
        tol = torch.finfo(ours[k].dtype).eps * w0.abs().max().item()  # one rounding step of the stored dtype
        err = (w0 - theirs[k].float()).abs().max().item()
        assert err <= tol, (k, err, tol)
        moved = (w0 - comfy.utils.get_attr(clip.patcher.model, k).float()).abs().max().item()
        assert moved > 10 * tol, (k, moved)  # the LoRA changed the weight far more than the tolerance


def test_stack_entry_block_weights_apply_to_that_lora_only(L, S, model, tmp_path):
    """A Stack entry's own block weights replace the fuse node's for that LoRA alone; the setting survives the
    fuse record (the export recomputes the same deltas); bad vectors are named with their LoRA."""
    from fewstep.nodes.lora_host import fuse_records
    vec = ["1"] * 17
    vec[1] = "0"  # IN01 off for the stacked KOHYA only
    own = ",".join(vec)
    s = L.FewStepLoraStack.execute(KOHYA, 1.0, None, own).args[0]
    assert s == ((KOHYA, 1.0, own),)
    in01 = [k for k in ATTN_PROBE if k.startswith("diffusion_model.input_blocks.1.")]
    assert in01
    m, rep, _ = L.fuse(model, L.NONE, 1.0, [("style-sd15-loha.safetensors", 0.5)] + L.stack_items(L.FUSE, s),
                       block_weights="ALL0.5")
    assert f"own block weights '{own}'" in rep, rep
    only_loha, _, _ = L.fuse(model, L.NONE, 1.0, [("style-sd15-loha.safetensors", 0.5)], block_weights="ALL0.5")
    kohya_in01, _, _ = L.fuse(model, L.NONE, 1.0, [(KOHYA, 1.0)], block_weights=own)
    kohya_all, _, _ = L.fuse(model, L.NONE, 1.0, [(KOHYA, 1.0)])
    for k in in01:  # KOHYA contributes nothing in IN01; LoHa at the node-level 0.5 does
        assert torch.equal(delta_of(m, k), delta_of(only_loha, k)), k
        assert k not in kohya_in01.patches
    other = [k for k in ATTN_PROBE if k not in in01]
    for k in other:  # elsewhere KOHYA is at its own 1, not the node's 0.5
        want = delta_of(only_loha, k) + delta_of(kohya_all, k)
        assert torch.allclose(delta_of(m, k), want, atol=1e-6 * want.abs().max().item()), k
    path, _ = S.export_fused(m, rank=4, dtype="fp32", output_dir=str(tmp_path))
    (rec,) = fuse_records(m)
    assert [a.block_weights for a in rec.adapters] == ["", own]
    deltas = dict(S.fused_deltas(S.EXPORT, m))
    for k in ATTN_PROBE:
        assert torch.equal(deltas[k], delta_of(m, k)), k
    with pytest.raises(ValueError, match=r"FewStep LoRA Stack: block_weights of 'style-sd15-kohya.safetensors'"):
        L.FewStepLoraStack.execute(KOHYA, 1.0, None, "1,2,x")
    xl = ",".join(["1"] * 12)  # an SDXL layout: valid on the Stack, refused by the fuse on SD1.5 naming the LoRA
    s_xl = L.FewStepLoraStack.execute(KOHYA, 1.0, None, xl).args[0]
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: block_weights of style LoRA "
                                         r"'style-sd15-kohya.safetensors' \(from FewStep LoRA Stack\)"):
        L.fuse(model, L.NONE, 1.0, L.stack_items(L.FUSE, s_xl))


def test_mostly_unknown_tensors_is_an_error(L, model, loras_tmp, standin_dir):
    """A file whose UNet tensors are mostly of no known adapter type stops instead of fusing the few it knows."""
    sd = {k: v for k, v in _kohya(standin_dir).items() if "input_blocks_1_1" in k or "down_blocks_0_attentions_0" in k}
    n_known = len(sd)
    for i in range(n_known + 1):
        sd[f"lora_unet_mystery_{i}.oft_diag"] = torch.zeros(4, 4)
    _write(loras_tmp / "mostly-unknown.safetensors", sd)
    with pytest.raises(ValueError, match=r"FewStep LoRA Fuse: .*mostly-unknown\.safetensors: \d+ of its \d+ UNet "
                                         r"tensors are of no known adapter type \(e.g. 'lora_unet_mystery_0.oft_diag'\)"):
        L.fuse(model, L.NONE, 1.0, [("mostly-unknown.safetensors", 1.0)])
