"""Tier b: fewstep's samplers, schedules and presets on the flow-matching stand-ins through the real host.

The diffusion models are the stand-ins of ``tools/standins`` loaded by the host's own ``load_diffusion_model``;
the text encoders are replaced by the test-only conditioning of ``tests/custom_nodes/fewstep_test_nodes``.
Core's ``lcm`` / ``euler`` run on CONST through the same KSampler path (``comfy.sample.sample``) with the same
replayed step noise; agreement is 1e-4 relative to the latent's scale (fp32).
"""
from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]


def _test_nodes():
    name = "fewstep_test_conditioning"
    if name not in sys.modules:
        path = REPO / "tests" / "custom_nodes" / "fewstep_test_nodes" / "conditioning.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def registered(host):
    from fewstep.nodes import registry
    registry.register()
    return registry


@pytest.fixture(scope="module")
def flow_dir(host):
    from tools import standins
    return standins.ensure(tuple(standins.FLOW_FAMILIES))


_LOADED: dict = {}


def load(flow_dir, key, role=None):
    """The family's stand-in diffusion model (cached for the module), as core UNETLoader loads it."""
    import comfy.sd
    from tools import standins
    fam = standins.family(key)
    role = role or next(iter(fam.models))
    if (key, role) not in _LOADED:
        _LOADED[(key, role)] = comfy.sd.load_diffusion_model(str(flow_dir / "diffusion_models" / fam.models[role].name))
    return _LOADED[(key, role)]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _LOADED.clear()
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture
def replay_noise(monkeypatch):
    """Core and fewstep draw the same step noise, keyed by the step's sigma (so a split run sees the same noise as
    the whole run): both look the host's default_noise_sampler up at call time."""
    import comfy.k_diffusion.sampling as K

    def factory(x, seed=None):
        def draw(sigma, sigma_next):
            g = torch.Generator().manual_seed(int(round(float(sigma) * 1e6)) + 17)
            return torch.randn(x.shape, generator=g).to(x)
        return draw

    monkeypatch.setattr(K, "default_noise_sampler", factory)


def with_sampling(model, kind):
    """The model with a core ModelSampling* node applied (or as loaded)."""
    from comfy_extras import nodes_model_advanced as A
    if kind == "default":
        return model
    if kind.startswith("sd3:"):
        return A.ModelSamplingSD3().patch(model, float(kind[4:]))[0]
    if kind.startswith("aura:"):
        return A.ModelSamplingAuraFlow().patch_aura(model, float(kind[5:]))[0]
    if kind.startswith("flux:"):
        return A.ModelSamplingFlux().patch(model, 1.15, 0.5, int(kind[5:]), int(kind[5:]))[0]
    raise ValueError(kind)


def sample(model, key, sampler, scheduler, steps, seed=3, batch=1, **kw):
    import comfy.sample
    from tools import standins
    fam = standins.family(key)
    latent = torch.zeros((batch, *fam.latent_shape[1:]))
    cond = _test_nodes().make_conditioning(key, seed=1, tokens=6)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 1.0, sampler, scheduler, cond, cond, latent, seed=seed,
                               disable_pbar=True, **kw)


def close(ours, ref):
    scale = max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert torch.isfinite(ours).all() and err < 1e-4 * scale, (err, scale)


@pytest.mark.parametrize("kind", ["default", "sd3:5.0", "aura:3.0", "flux:1024"],
                         ids=["DiscreteFlow-shift3", "ModelSamplingSD3-5", "ModelSamplingAuraFlow-3", "ModelSamplingFlux"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_and_euler_equal_core_on_const(flow_dir, registered, replay_noise, kind, steps):
    """fewstep_lcm == core lcm and fewstep_pcm == core euler on the SD3 stand-in with the host's flow model
    samplings (ModelSamplingDiscreteFlow with shift, multiplier 1 as AuraFlow sets it, ModelSamplingFlux), core's
    simple scheduler on both sides; TCD at gamma 0 / 1 (FewStep Settings) gives the same two runs."""
    from fewstep.nodes.presets import FewStepSettings
    model = with_sampling(load(flow_dir, "sd3"), kind)
    lcm_ref = sample(model, "sd3", "lcm", "simple", steps)
    euler_ref = sample(model, "sd3", "euler", "simple", steps)
    close(sample(model, "sd3", "fewstep_lcm", "simple", steps), lcm_ref)
    close(sample(model, "sd3", "fewstep_pcm", "simple", steps), euler_ref)
    for gamma, ref in ((1.0, lcm_ref), (0.0, euler_ref)):
        m = FewStepSettings.execute(model, "none", gamma, "x0", "cpu", "off", 0)[0]
        close(sample(m, "sd3", "fewstep_tcd", "simple", steps), ref)
    if steps > 1:
        assert not torch.allclose(lcm_ref, euler_ref, atol=1e-3)


def test_video_latents_equal_core_and_keep_batch_index_noise(flow_dir, registered, replay_noise):
    """Wan (5-D latents, ModelSamplingSD3 shift 5): fewstep_lcm == core lcm."""
    model = with_sampling(load(flow_dir, "wan", "t2v"), "sd3:5.0")
    close(sample(model, "wan", "fewstep_lcm", "simple", 3), sample(model, "wan", "lcm", "simple", 3))


def test_video_batch_index_step_noise(flow_dir, registered):
    """With fewstep's own noise (initial: FewStep Noise's per-index draw; step: per (seed, index)) video k of a batch
    equals video k sampled alone with batch_offset k, on the Wan stand-in's 5-D latents."""
    import comfy.samplers
    from fewstep.nodes import engine
    from fewstep.samplers.noise import initial_noise
    from tools import standins
    model = with_sampling(load(flow_dir, "wan", "t2v"), "sd3:5.0")
    shape = standins.family("wan").latent_shape
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
    cond = _test_nodes().make_conditioning("wan", seed=1, tokens=6)

    def run(batch, offset):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(cond, cond)
        guider.set_cfg(1.0)
        noise = initial_noise((batch, *shape[1:]), 5, list(range(offset, offset + batch)))
        return guider.sample(noise, torch.zeros((batch, *shape[1:])), engine.make_sampler("tcd", gamma=0.5,
                             batch_offset=offset), sigmas, disable_pbar=True, seed=11)

    three = run(3, 0)
    assert three.ndim == 5 and not torch.allclose(three[0], three[1])
    for k in range(3):
        torch.testing.assert_close(run(1, k)[0], three[k], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sampler, core", [("fewstep_pcm", "euler"), ("fewstep_lcm", "lcm"), ("fewstep_tcd", None)])
def test_split_run_equals_the_unsplit_run(flow_dir, registered, replay_noise, sampler, core):
    """KSamplerAdvanced's two-stage recipe (stage 1 returns with leftover noise, stage 2 adds none): the first stage
    hands back what the host's inverse_noise_scaling gives, the second continues the same trajectory."""
    import nodes
    from tools import standins
    model = with_sampling(load(flow_dir, "wan", "t2v"), "sd3:5.0")
    latent = {"samples": torch.zeros(standins.family("wan").latent_shape)}
    cond = _test_nodes().make_conditioning("wan", seed=1, tokens=6)
    for name in [sampler] + ([core] if core else []):
        whole = nodes.common_ksampler(model, 4, 4, 1.0, name, "simple", cond, cond, latent)[0]["samples"]
        first = nodes.common_ksampler(model, 4, 4, 1.0, name, "simple", cond, cond, latent, start_step=0,
                                      last_step=2, force_full_denoise=False)[0]
        second = nodes.common_ksampler(model, 4, 4, 1.0, name, "simple", cond, cond, first, disable_noise=True,
                                       start_step=2, last_step=10000, force_full_denoise=True)[0]["samples"]
        close(second, whole)
        assert not torch.allclose(first["samples"], whole, atol=1e-3)


@pytest.mark.parametrize("split", [False, True], ids=["to-sigma-0", "split-sigmas"])
def test_fused_path_equals_unfused_on_a_flow_model(flow_dir, registered, monkeypatch, split):
    pytest.importorskip("triton")
    import comfy.samplers
    from fewstep.kernels import loop as kernel_loop
    from fewstep.nodes import engine
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FEWSTEP_ALLOW_TRITON_INTERPRETER", "1")
    monkeypatch.setattr(kernel_loop, "use_fused", lambda mode, x: mode == "on")
    used, real = [], kernel_loop.sample_fused
    monkeypatch.setattr(kernel_loop, "sample_fused", lambda *a, **k: used.append(1) or real(*a, **k))
    model = with_sampling(load(flow_dir, "sd3"), "sd3:3.0")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "fewstep_trailing", 3)
    if split:
        sigmas = sigmas[:-1]
    cond = _test_nodes().make_conditioning("sd3", seed=1, tokens=6)
    outs = []
    for fused in ("off", "on"):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(cond, cond)
        guider.set_cfg(1.0)
        noise = torch.randn((1, 16, 4, 4), generator=torch.Generator().manual_seed(0))
        outs.append(guider.sample(noise, torch.zeros(1, 16, 4, 4), engine.make_sampler("tcd", gamma=0.4, fused=fused),
                                  sigmas, disable_pbar=True, seed=5))
    assert used == [1] and torch.equal(outs[0], outs[1])


FLOW_PRESETS = ["Hyper-SD3 4-step", "Hyper-SD3 8-step", "Hyper-SD3 16-step", "PCM-SD3 4-step",
                "PCM-SD3 stochastic 4-step", "Hyper-FLUX 8-step", "Hyper-FLUX 16-step", "FLUX.1 Turbo-Alpha 8-step",
                "Wan 2.1 lightx2v 4-step", "Wan 2.1 CausVid", "Wan 2.2 Lightning 4-step", "Qwen-Image-Lightning 4-step",
                "Qwen-Image-Lightning 8-step", "HunyuanVideo FastVideo"]


def _prefix(model):
    """The core node that sets a shift on this model's timestep scale: ModelSamplingAuraFlow where the model is
    conditioned on sigma itself (Qwen-Image), ModelSamplingSD3 where on 1000*sigma."""
    return "aura:" if float(model.get_model_object("model_sampling").timestep(torch.tensor(1.0))) == 1 else "sd3:"


def _core_sampling_for(model, preset):
    """What the card's ComfyUI recipe puts after the loader: ModelSamplingSD3 / AuraFlow with the card's shift."""
    return model if preset.shift is None else with_sampling(model, _prefix(model) + str(preset.shift))


@pytest.mark.parametrize("name", FLOW_PRESETS)
def test_every_flow_preset_gives_sigmas_on_its_family(flow_dir, registered, name):
    """FewStep Preset, and FewStep Settings + KSampler's fewstep_auto scheduler, give the preset's sigmas on its
    family's stand-in: the card's grid with the card's shift (= core ModelSamplingSD3/AuraFlow with that shift +
    simple, where the card's grid is that); a ModelSampling node upstream is used instead; the wrong family is an
    error naming both."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    from fewstep.nodes.presets import FewStepPreset, FewStepSettings
    from fewstep.samplers import presets as table
    p = table.get_preset(name)
    base = p.bases[0]
    model = load(flow_dir, base, "high_noise" if name.startswith("Wan 2.2") else None)
    sampler, sigmas, cfg, guidance = FewStepPreset.execute(model, name, 0, 1.0, -1.0).args
    assert len(sigmas) == p.steps + 1 and float(sigmas[-1]) == 0 and float(sigmas[0]) == pytest.approx(1.0)
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and cfg == p.cfg and guidance == (p.guidance or 0.0)
    core = _core_sampling_for(model, p)
    if p.schedule in ("trailing", "simple") and 1000 % p.steps == 0:
        torch.testing.assert_close(sigmas, BasicScheduler.execute(core, "simple", p.steps, 1.0)[0], rtol=0, atol=1e-6)
    else:  # the flowmatch / PCM grids, placed on the host's own ModelSamplingSD3(shift) object
        want = table.preset_sigmas(p, core.get_model_object("model_sampling"), base=base, keep_model_shift=True)
        torch.testing.assert_close(sigmas, want, rtol=0, atol=1e-6)
    m = FewStepSettings.execute(model, name, -1.0, "x0", "cpu", "off", 0)[0]
    ks = comfy.samplers.KSampler(m, steps=p.steps, device="cpu", sampler="fewstep_auto", scheduler="fewstep_auto")
    torch.testing.assert_close(ks.sigmas.cpu(), sigmas, rtol=0, atol=1e-6)
    # a user's ModelSampling node, before or after FewStep Settings, is used instead of the card's shift
    kind = "flux:512" if p.shift is None else _prefix(model) + "2.0"
    user = with_sampling(model, kind)
    want = FewStepPreset.execute(user, name, 0, 1.0, -1.0).args[1]
    assert not torch.allclose(want, sigmas, atol=1e-4)
    torch.testing.assert_close(want, table.preset_sigmas(p, user.get_model_object("model_sampling"), base=base,
                                                         keep_model_shift=True), rtol=0, atol=1e-6)
    for mm in (FewStepSettings.execute(user, name, -1.0, "x0", "cpu", "off", 0)[0], with_sampling(m, kind)):
        got = comfy.samplers.KSampler(mm, steps=p.steps, device="cpu", sampler="fewstep_auto",
                                      scheduler="fewstep_auto").sigmas.cpu()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    wrong = "flux" if base != "flux" else "sd3"
    for call in (lambda: FewStepPreset.execute(load(flow_dir, wrong), name, 0, 1.0, -1.0),
                 lambda: FewStepSettings.execute(load(flow_dir, wrong), name, -1.0, "x0", "cpu", "off", 0)):
        with pytest.raises(ValueError, match=rf"FewStep (Preset|Settings): preset '{name}' is for .*'{base}'.* but "
                                             rf"this model is .*'{wrong}'"):
            call()


def test_wan22_lightning_boundary_and_timesteps(flow_dir, registered):
    from fewstep.nodes.presets import FewStepPreset
    from fewstep.samplers import presets as table
    p = table.get_preset("Wan 2.2 Lightning 4-step")
    for role in ("high_noise", "low_noise"):
        sigmas = FewStepPreset.execute(load(flow_dir, "wan", role), p.name, 0, 1.0, -1.0).args[1]
        assert (sigmas * 1000).tolist() == pytest.approx([1000, 937.5, 833.333, 625, 0], abs=1e-3)
    assert table.preset_boundary(p, 4) == 2


def test_sd_presets_on_flow_models_and_flow_presets_on_sd_are_refused(flow_dir, registered, standin_dir):
    import comfy.sd
    from fewstep.nodes.presets import FewStepPreset
    with pytest.raises(ValueError, match=r"FewStep Preset: preset 'LCM-LoRA' is for SD-family .* but this model is "
                                         r"SD3 \('sd3'\), a flow-matching model"):
        FewStepPreset.execute(load(flow_dir, "sd3"), "LCM-LoRA", 0, 1.0, -1.0)
    sd15 = comfy.sd.load_checkpoint_guess_config(str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"),
                                                 output_vae=False, output_clip=False)[0]
    with pytest.raises(ValueError, match=r"preset 'Hyper-SD3 4-step' is for SD3 \('sd3'\) models, but this model is "
                                         r"SD1.5 \('sd15'\)"):
        FewStepPreset.execute(sd15, "Hyper-SD3 4-step", 0, 1.0, -1.0)
    with pytest.raises(ValueError, match=r"preset 'DMD2 4-step' is for SDXL \('sdxl'\) models, but this model is "
                                         r"SD1.5"):
        FewStepPreset.execute(sd15, "DMD2 4-step", 0, 1.0, -1.0)


@pytest.mark.parametrize("name, config", [("DMD2 4-step", "SDXL"), ("SDXL-Turbo", "SDXL"), ("SD-Turbo", "SD21UnclipH"),
                                          ("Flash Diffusion SDXL 4-step", "SDXL")])
def test_sd_card_presets_on_their_hosts_model_sampling(registered, name, config):
    """The SD card presets on the host's own model sampling of their family (SDXL / SD2.x: no real-size stand-in
    is loaded for these in the host tier)."""
    import comfy.model_base
    import comfy.supported_models as S
    from fewstep.samplers import presets as table
    cfg = getattr(S, config if config != "SD21UnclipH" else "SD20")({"in_channels": 4})
    ms = comfy.model_base.model_sampling(cfg, comfy.model_base.ModelType.EPS)
    p = table.get_preset(name)
    sig = table.preset_sigmas(p, ms, 0, 1.0, p.bases[0])
    assert ms.timestep(sig[:-1]).tolist() == table.preset_timesteps(p, 0)
