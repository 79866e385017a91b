"""Tier b: the flow-matching / DiT stand-ins (tools/standins) through the real host's own loaders.

Each diffusion model is loaded with ``comfy.sd.load_diffusion_model`` (what core UNETLoader runs) and must be
detected as the right class with the right model sampling, load with no missing, unexpected or left-over key, and
give finite, bounded values in one forward pass (one euler step at cfg 1 through ``comfy.sample.sample``, the
KSampler path).  Each VAE is loaded with ``comfy.sd.VAE`` (what core VAELoader runs) and must decode that latent.
The text encoders are replaced in tests only by ``tests/custom_nodes/fewstep_test_nodes`` (FewStepTestConditioning).
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
LOAD_PROBLEMS = ("unet missing", "unet unexpected", "left over keys", "Missing VAE keys", "Leftover VAE keys")


def _test_nodes():
    """The test-only conditioning module (tests/custom_nodes/fewstep_test_nodes/conditioning.py), by path."""
    name = "fewstep_test_conditioning"
    if name not in sys.modules:
        path = REPO / "tests" / "custom_nodes" / "fewstep_test_nodes" / "conditioning.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _cases():
    from tools import standins
    return [(fam.key, role) for fam in standins.FLOW_FAMILIES.values() for role in fam.models]


@pytest.fixture(scope="module")
def flow_dir(host):
    from tools import standins
    return standins.ensure(tuple(standins.FLOW_FAMILIES))


@pytest.fixture
def free_models():
    yield
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()


def _problems(caplog) -> list[str]:
    return [r.getMessage()[:300] for r in caplog.records if any(p in r.getMessage() for p in LOAD_PROBLEMS)]


def _sample_once(model, fam, seed=0):
    """One euler step from pure noise at cfg 1 (one model call) on the family's tiny latent, as core KSampler runs it
    (``nodes.common_ksampler``: an image latent of a video-latent family gets its frame axis there)."""
    import nodes
    cond = _test_nodes().make_conditioning(fam.key, seed=seed, tokens=8)
    (out,) = nodes.common_ksampler(model, seed, 1, 1.0, "euler", "simple", cond, cond,
                                   {"samples": torch.zeros(fam.latent_shape)})
    return out["samples"]


@pytest.mark.parametrize("key,role", _cases())
def test_diffusion_model_detected_loaded_and_finite(flow_dir, key, role, caplog, free_models):
    import comfy.model_sampling
    import comfy.sd
    from tools import standins
    fam = standins.family(key)
    mf = fam.models[role]
    path = flow_dir / "diffusion_models" / mf.name
    with caplog.at_level(logging.INFO):
        model = comfy.sd.load_diffusion_model(str(path))
    assert _problems(caplog) == [], f"{mf.name} did not load cleanly: {_problems(caplog)}"
    assert type(model.model).__name__ == fam.host_class, (mf.name, type(model.model).__mro__)
    detected = model.model.model_config.unet_config
    for k, v in mf.config.items():
        assert detected.get(k) == v, (mf.name, k, detected.get(k), v)
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, getattr(comfy.model_sampling, fam.model_sampling)), type(ms).__mro__
    assert isinstance(ms, comfy.model_sampling.CONST), type(ms).__mro__
    for k, v in fam.sampling_defaults.items():
        assert getattr(ms, k) == pytest.approx(v), (k, getattr(ms, k), v)
    out = _sample_once(model, fam)
    assert out.shape[:2] == fam.latent_shape[:2] and out.shape[-2:] == fam.latent_shape[-2:], out.shape
    assert torch.isfinite(out).all(), f"{mf.name}: non-finite values after one step"
    std = float(out.std())
    print(f"{mf.name}: one euler step from noise, latent std {std:.3f}, max |x| {float(out.abs().max()):.2f}")
    assert 0.05 < std < 20 and float(out.abs().max()) < 200, (mf.name, std)


@pytest.mark.parametrize("key,role", _cases())
def test_released_keys_map_one_to_one_onto_the_host_model(flow_dir, key, role):
    """The file holds exactly the host model's tensors, under the release's names (renamed by the host on load)."""
    import comfy.model_detection as md
    import comfy.utils
    from tools import standins
    from tools.standins import flow
    mf = standins.family(key).models[role]
    sd = comfy.utils.load_torch_file(str(flow_dir / "diffusion_models" / mf.name))
    host = flow.host_model_state_dict(mf.config)
    prefix = md.unet_prefix_from_state_dict(sd) if mf.prefix else ""
    assert prefix == mf.prefix
    config = md.model_config_from_unet({k[len(prefix):]: v for k, v in sd.items()}, "")
    renamed = config.process_unet_state_dict({k[len(prefix):]: v for k, v in sd.items()})
    assert set(renamed) == set(host)
    assert all(tuple(renamed[k].shape) == tuple(host[k].shape) for k in host)
    assert {v.dtype for v in sd.values()} == {mf.dtype}
    if mf.release_key is not None:  # the release's own names are in the file, not the host's
        assert set(sd) != {mf.prefix + k for k in host}


def test_wan22_experts_are_two_seeds_of_one_layout(flow_dir):
    from safetensors import safe_open
    from tools import standins
    fam = standins.family("wan")
    high, low = (flow_dir / "diffusion_models" / fam.models[r].name for r in ("high_noise", "low_noise"))
    with safe_open(str(high), "pt") as a, safe_open(str(low), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        k = "blocks.0.self_attn.q.weight"
        assert a.get_tensor(k).shape == b.get_tensor(k).shape
        assert not torch.equal(a.get_tensor(k), b.get_tensor(k))
    assert "high_noise" in high.name and "low_noise" in low.name


@pytest.mark.parametrize("key", ["sd3", "flux", "wan", "qwen_image", "hunyuan_video"])
def test_vae_loads_cleanly_and_decodes(flow_dir, key, caplog, free_models):
    import comfy.sd
    import comfy.utils
    from tools import standins
    fam = standins.family(key)
    path = flow_dir / "vae" / fam.vae.name
    sd = comfy.utils.load_torch_file(str(path))
    with caplog.at_level(logging.DEBUG):
        vae = comfy.sd.VAE(sd=dict(sd))
    assert _problems(caplog) == [], _problems(caplog)
    assert set(vae.first_stage_model.state_dict()) == set(sd)
    video = key in ("wan", "qwen_image", "hunyuan_video")  # Qwen-Image's images are one-frame Wan 2.1 latents
    assert vae.latent_channels == 16 and vae.latent_dim == (3 if video else 2)
    latent = torch.randn(fam.latent_shape, generator=torch.Generator().manual_seed(1))
    if latent.ndim == 4 and video:
        latent = latent.unsqueeze(2)
    with torch.inference_mode():
        img = vae.decode(latent)
    print(f"{fam.vae.name}: latent {tuple(latent.shape)} -> images {tuple(img.shape)}, std {float(img.std()):.3f}")
    assert torch.isfinite(img).all() and img.shape[-1] == 3
    assert float(img.std()) > 0.05, "flat decode"


@pytest.mark.parametrize("key", ["sd3", "flux", "wan", "qwen_image", "hunyuan_video"])
def test_core_empty_latent_node_gives_the_family_shape(host, key):
    import nodes  # noqa: F401  (initialises the host's node registry)
    from comfy_extras import nodes_hunyuan, nodes_sd3
    from tools import standins
    fam = standins.family(key)
    node, inputs = fam.latent
    cls = {"EmptySD3LatentImage": nodes_sd3.EmptySD3LatentImage,
           "EmptyHunyuanLatentVideo": nodes_hunyuan.EmptyHunyuanLatentVideo}[node]
    out = cls.execute(**inputs)
    assert tuple(out[0]["samples"].shape) == fam.latent_shape


def test_conditioning_shapes_match_the_models_text_inputs(flow_dir):
    """The test-only conditioning has each stand-in's text width and pooled width (read from the files)."""
    from safetensors import safe_open
    from tools import standins
    C = _test_nodes()
    reads = {"sd3": ("model.diffusion_model.context_embedder.weight", "model.diffusion_model.y_embedder.mlp.0.weight"),
             "flux": ("txt_in.weight", "vector_in.in_layer.weight"),
             "wan": ("text_embedding.0.weight", None),
             "qwen_image": ("txt_in.weight", None),
             "hunyuan_video": ("txt_in.input_embedder.weight", "vector_in.in_layer.weight")}
    for key, (ctx, pooled) in reads.items():
        fam = standins.family(key)
        [[cond, extra]] = C.make_conditioning(key, seed=3, tokens=5)
        assert cond.shape == (1, 5, C.FAMILIES[key][0])
        with safe_open(str(flow_dir / "diffusion_models" / next(iter(fam.models.values())).name), "pt") as f:
            assert f.get_slice(ctx).get_shape()[1] == cond.shape[-1], key
            if pooled:
                assert f.get_slice(pooled).get_shape()[1] == extra["pooled_output"].shape[-1], key
            else:
                assert "pooled_output" not in extra
    with pytest.raises(ValueError, match="FewStepTestConditioning: unknown family"):
        C.make_conditioning("sdxl", 0)


# ---------------------------------------------------------------- DiT LoRA stand-ins

def _lora_cases(reference=None):
    from tools import standins
    return [(fam.key, lf.name) for fam in standins.FLOW_FAMILIES.values() for lf in fam.loras
            if reference is None or (lf.reference != "core") == reference]


def _lora(flow_dir, key, name):
    import comfy.utils
    from tools import standins
    fam = standins.family(key)
    lf = next(lf for lf in fam.loras if lf.name == name)
    path, _ = standins.lora_files(key, flow_dir)[name]
    return fam, lf, comfy.utils.load_torch_file(str(path))


def _meta_model(fam, role):
    import comfy.model_detection as md
    config = md.model_config_from_unet_config(dict(fam.models[role].config))
    with torch.device("meta"):
        return config.get_model({})


@pytest.mark.parametrize("key,name", _lora_cases())
def test_core_lora_loader_maps_what_core_maps(flow_dir, key, name, caplog):
    """Core's own loader (model_lora_keys_unet + lora_convert + load_lora, as LoraLoaderModelOnly runs it) loads every
    key except those the file's ``core_drops`` names, and every loaded patch fits the weight it patches."""
    import re

    import comfy.lora
    import comfy.lora_convert
    fam, lf, sd = _lora(flow_dir, key, name)
    model = _meta_model(fam, lf.target)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(sd)), key_map)
    not_loaded = {r.getMessage().split(": ", 1)[1] for r in caplog.records
                  if r.getMessage().startswith("lora key not loaded")}
    expected = {k for k in sd if any(re.fullmatch(p, k) for p in lf.core_drops)}
    assert not_loaded == expected, (sorted(not_loaded - expected)[:5], sorted(expected - not_loaded)[:5])
    assert bool(patches) == (lf.core_drops != (".*",))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for target, patch in patches.items():
        weight_key, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        shape = list(shapes[weight_key])
        if offset is not None:
            shape[offset[0]] = offset[2]
        if isinstance(patch, tuple):  # ("diff", (tensor,)): a whole difference
            assert patch[0] == "diff" and list(patch[1][0].shape) == shape, (weight_key, shape)
        else:
            up, down = patch.weights[0], patch.weights[1]
            assert up.shape[0] == shape[0] and down.flatten(1).shape[1] == int(np.prod(shape[1:])), (weight_key, shape)
            assert down.shape[0] == lf.rank
    downs = [k for k in sd if k.endswith((".lora_down.weight", ".lora_A.weight"))]
    assert downs and all(sd[k].dtype == lf.dtype for k in downs)
    assert ({float(v) for k, v in sd.items() if k.endswith(".alpha")} or {None}) == {lf.alpha}
    print(f"{name}: {len(downs)} LoRA modules, core loads {len(patches)} patches, leaves {len(not_loaded)} keys")


@pytest.mark.parametrize("key,name", _lora_cases(reference=True))
def test_lora_names_are_the_trainers_names(flow_dir, key, name):
    """Checked without ComfyUI: diffusers-named files name Linear modules of diffusers' own transformer of the family;
    the other layouts go through the diffusers converter that reads them, whose output must name such modules."""
    import diffusers.loaders.lora_conversion_utils as conv
    fam, lf, sd = _lora(flow_dir, key, name)
    if lf.reference != "diffusers":
        sd = getattr(conv, lf.reference)(dict(sd))
    linears = {n: m for n, m in fam.diffusers_model(lf.target).named_modules() if isinstance(m, torch.nn.Linear)}
    seen = set()
    for k, v in sd.items():
        assert k.startswith("transformer."), k
        module, _, leaf = k[len("transformer."):].partition(".lora_")
        assert module in linears, f"{name}: {k} names no Linear module of diffusers' transformer"
        lin = linears[module]
        if leaf == "A.weight":
            assert v.shape[1] == lin.in_features, k
        elif leaf == "B.weight":
            assert v.shape[0] == lin.out_features, k
        elif leaf == "B.bias":
            assert v.shape[0] == lin.out_features, k
        else:
            raise AssertionError(f"{name}: unexpected key {k}")
        seen.add(module)
    assert seen, name
