"""In-process host: FewStep Two-Expert Sampler (nodes/experts.py) against the host's own single and split runs.

* The same model in both slots gives the single-model run (SamplerCustom's ``comfy.sample.sample_custom`` over the
  whole sigmas) at every boundary step: core euler and the fewstep LCM / TCD / PCM samplers (whose step noise runs
  on across the boundary) on the Wan 2.2 stand-in (flow, CONST), and the fewstep samplers on the SD1.5 stand-in
  (VP). The stage hand-over goes through the host's ``inverse_noise_scaling`` / ``noise_scaling`` and the latent
  format's out/in scaling, which round in float32: "equal" is within 1e-6 of the latent's scale.
* Two different experts give exactly (bit for bit) core's hand-wired split: KSamplerAdvanced on model_high steps
  0 -> b with leftover noise, then KSamplerAdvanced on model_low b -> end with add_noise disabled (Wan 2.2 A14B
  high/low stand-ins, euler and core's stochastic lcm).
* One progress bar over all steps; bad inputs raise errors that name the node and the input.

The text encoder is replaced by the test-only conditioning of tests/custom_nodes (umT5-XXL is too large for CI).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.host

STEPS = 4


def conditioning():
    """The test-only conditioning module (tests/custom_nodes/fewstep_test_nodes/conditioning.py), by path."""
    name = "fewstep_test_conditioning"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "custom_nodes" / "fewstep_test_nodes" / "conditioning.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def wan(host):
    """The Wan 2.2 A14B expert stand-ins after ModelSamplingSD3 shift 5 (the Lightning workflows' shift), the
    conditioning and the empty video latent (64 px, 5 frames)."""
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from tools import standins
    root = standins.ensure(("wan",))
    fam = standins.family("wan")
    models = {}
    for role in ("high_noise", "low_noise"):
        m = comfy.sd.load_diffusion_model(str(root / "diffusion_models" / fam.models[role].name))
        models[role] = ModelSamplingSD3().patch(m, 5.0)[0]
    cond = conditioning().make_conditioning("wan", seed=3, tokens=8)
    return models["high_noise"], models["low_noise"], cond, torch.zeros(fam.latent_shape)


@pytest.fixture(scope="module")
def sd15(host, standin_dir):
    import comfy.sd
    model, clip = comfy.sd.load_checkpoint_guess_config(
        str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"))[:2]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a red boat"), return_pooled=True)
    return model, [[cond, {"pooled_output": pooled}]], torch.zeros(1, 4, 8, 8)


@pytest.fixture(scope="module")
def node(host):
    from fewstep.nodes import registry
    from fewstep.nodes.experts import FewStepTwoExpertSampler
    registry.register()
    return FewStepTwoExpertSampler


def simple_sigmas(model, steps=STEPS):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()


def fewstep_sampler(kind, **options):
    from fewstep.nodes import engine
    return engine.make_sampler(kind, **options)


def core_sampler(name):
    import comfy.samplers
    return comfy.samplers.sampler_object(name)


def single_run(model, cond, latent, sampler, sigmas, seed=7, cfg=1.0):
    """SamplerCustom's run (add_noise on) on one model over all the sigmas."""
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, cond, cond, latent, seed=seed,
                                      disable_pbar=True)


def two_expert(node, high, low, cond, latent, sampler, sigmas, b, seed=7, cfg=(1.0, 1.0)):
    out, denoised = node.execute(high, low, True, seed, cfg[0], cfg[1], cond, cond, sampler, sigmas, b,
                                 {"samples": latent})
    return out["samples"], denoised["samples"]


def assert_same_run(ours, ref, what):
    assert torch.isfinite(ours).all(), what
    scale = max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    print(f"{what}: max |two-expert - single| = {err:.3g} (latent scale {scale:.3g})")
    assert err <= 1e-6 * scale, (what, err, scale)


@pytest.mark.parametrize("b", range(STEPS + 1))
def test_same_model_in_both_slots_is_the_single_run_core_euler_on_wan(node, wan, b):
    high, _, cond, latent = wan
    sigmas = simple_sigmas(high)
    ref = single_run(high, cond, latent, core_sampler("euler"), sigmas)
    ours, _ = two_expert(node, high, high, cond, latent, core_sampler("euler"), sigmas, b)
    assert_same_run(ours, ref, f"wan euler b={b}")


@pytest.mark.parametrize("kind", ["lcm", "tcd", "pcm"])
@pytest.mark.parametrize("b", [1, 2, 3])
def test_same_model_in_both_slots_is_the_single_run_fewstep_on_wan(node, wan, kind, b):
    """On the flow model: LCM re-noises, TCD moves to (1 - gamma) * sigma_next then re-noises, PCM is Euler; the
    stochastic ones draw one step-noise stream across the boundary."""
    high, _, cond, latent = wan
    sigmas = simple_sigmas(high)
    options = {"gamma": 0.5} if kind == "tcd" else {}
    ref = single_run(high, cond, latent, fewstep_sampler(kind, **options), sigmas)
    ours, _ = two_expert(node, high, high, cond, latent, fewstep_sampler(kind, **options), sigmas, b)
    assert_same_run(ours, ref, f"wan {kind} b={b}")


def test_same_model_in_both_slots_is_the_single_run_fewstep_lcm_on_sd15(node, sd15):
    """A VP (eps) model too: stochastic LCM on the LCM grid, 2 steps split after the first."""
    from fewstep.nodes.sampling import FewStepScheduleLCM
    model, cond, latent = sd15
    sigmas = FewStepScheduleLCM.execute(model, 2, 1.0, "50")[0]
    ref = single_run(model, cond, latent, fewstep_sampler("lcm"), sigmas)
    ours, _ = two_expert(node, model, model, cond, latent, fewstep_sampler("lcm"), sigmas, 1)
    assert_same_run(ours, ref, "sd15 lcm b=1")


def test_fewstep_stochastic_split_is_the_unsplit_run_unlike_a_restarted_split(node, wan):
    """A fewstep name from KSamplerSelect is recognised too; two plain stages (as two KSamplerAdvanced nodes run
    them) restart a stochastic sampler's noise at the boundary and give another latent, the node does not."""
    import comfy.sample
    from fewstep.nodes.experts import is_fewstep
    assert is_fewstep(core_sampler("fewstep_lcm")) and is_fewstep(fewstep_sampler("tcd"))
    assert is_fewstep(core_sampler("fewstep_auto"))
    assert not is_fewstep(core_sampler("lcm")) and not is_fewstep(core_sampler("euler"))
    high, _, cond, latent = wan
    sigmas = simple_sigmas(high)
    ref = single_run(high, cond, latent, fewstep_sampler("lcm"), sigmas)
    ours, _ = two_expert(node, high, high, cond, latent, core_sampler("fewstep_lcm"), sigmas, 2)
    assert_same_run(ours, ref, "wan fewstep_lcm (KSamplerSelect) b=2")
    noise = comfy.sample.prepare_noise(latent, 7)
    mid = comfy.sample.sample_custom(high, noise, 1.0, fewstep_sampler("lcm"), sigmas[:3], cond, cond, latent,
                                     seed=7, disable_pbar=True)
    restarted = comfy.sample.sample_custom(high, torch.zeros_like(noise), 1.0, fewstep_sampler("lcm"), sigmas[2:],
                                           cond, cond, mid, seed=7, disable_pbar=True)
    assert (restarted - ref).abs().max().item() > 1e-2


def ksampler_advanced_split(high, low, cond, latent, sampler_name, b, seed=7, cfg=(1.0, 1.0), scheduler="simple"):
    """Core's hand-wired Wan 2.2 split: two KSamplerAdvanced nodes."""
    import nodes
    ksa = nodes.KSamplerAdvanced()
    (mid,) = ksa.sample(high, "enable", seed, STEPS, cfg[0], sampler_name, scheduler, cond, cond,
                        {"samples": latent}, 0, b, "enable")
    (out,) = ksa.sample(low, "disable", seed, STEPS, cfg[1], sampler_name, scheduler, cond, cond, mid, b, 10000,
                        "disable")
    return out["samples"]


@pytest.mark.parametrize("sampler_name", ["euler", "lcm"])
@pytest.mark.parametrize("b", [1, 2])
def test_two_experts_equal_two_ksampler_advanced_stages(node, wan, sampler_name, b):
    high, low, cond, latent = wan
    ref = ksampler_advanced_split(high, low, cond, latent, sampler_name, b, cfg=(1.0, 2.0))
    ours, _ = two_expert(node, high, low, cond, latent, core_sampler(sampler_name), simple_sigmas(high), b,
                         cfg=(1.0, 2.0))
    assert torch.equal(ours, ref), (sampler_name, b, (ours - ref).abs().max().item())
    # model_low really runs: the same node with model_high in both slots gives another latent.
    same, _ = two_expert(node, high, high, cond, latent, core_sampler(sampler_name), simple_sigmas(high), b,
                         cfg=(1.0, 2.0))
    assert (same - ours).abs().max().item() > 1e-3


def test_wan22_lightning_preset_equals_two_ksampler_advanced_on_fewstep_settings(node, wan):
    """FewStep Preset "Wan 2.2 Lightning 4-step" into the node == the plain-KSampler way: FewStep Settings with the
    preset on each expert and two KSamplerAdvanced with sampler and scheduler fewstep_auto (the card's timesteps
    1000, 937.5, 833.3, 625; the switch at the preset's boundary, step 2)."""
    from fewstep.nodes.presets import FewStepPreset, FewStepSettings
    from fewstep.samplers import presets
    high, low, cond, latent = wan
    name = "Wan 2.2 Lightning 4-step"
    sampler, sigmas, cfg = FewStepPreset.execute(high, name, 0, 1.0, -1.0)[:3]
    ms = high.get_model_object("model_sampling")
    assert ms.timestep(sigmas[:-1]).tolist() == pytest.approx([1000, 937.5, 833.333, 625], abs=1e-2)
    b = presets.preset_boundary(presets.get_preset(name))
    assert b == 2
    ours, _ = two_expert(node, high, low, cond, latent, sampler, sigmas, b, cfg=(cfg, cfg))
    settings = [FewStepSettings.execute(m, name, -1.0, "x0", "cpu", "off", 0)[0] for m in (high, low)]
    ref = ksampler_advanced_split(*settings, cond, latent, "fewstep_auto", b, cfg=(cfg, cfg), scheduler="fewstep_auto")
    assert torch.equal(ours, ref), (ours - ref).abs().max().item()


def test_one_progress_bar_over_all_steps_and_the_denoised_output(node, wan):
    import comfy.utils
    high, low, cond, latent = wan
    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        out, denoised = two_expert(node, high, low, cond, latent, core_sampler("euler"), simple_sigmas(high), 2)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert seen == [(i, STEPS) for i in range(1, STEPS + 1)], seen
    # euler's last step lands on the model's x0: the denoised output is that x0.
    assert torch.allclose(denoised, out, atol=1e-5 * max(1.0, out.abs().max().item()))


def test_input_models_are_not_modified(node, wan):
    high, low, cond, latent = wan
    before = [(m.model_options.copy(), dict(m.object_patches), len(m.patches)) for m in (high, low)]
    two_expert(node, high, low, cond, latent, core_sampler("euler"),
               simple_sigmas(high), 2)
    after = [(m.model_options.copy(), dict(m.object_patches), len(m.patches)) for m in (high, low)]
    assert before == after


def test_bad_inputs_name_the_node_and_the_input(node, wan, sd15):
    high, low, cond, latent = wan
    sigmas = simple_sigmas(high)
    with pytest.raises(ValueError, match=r"FewStep Two-Expert Sampler: boundary_step 5 .* choose 0\.\.4"):
        two_expert(node, high, low, cond, latent, core_sampler("euler"), sigmas, 5)
    with pytest.raises(ValueError, match=r"FewStep Two-Expert Sampler: the sigmas input has 1 value"):
        two_expert(node, high, low, cond, latent, core_sampler("euler"), sigmas[-1:], 0)
    with pytest.raises(ValueError, match=r"FewStep Two-Expert Sampler: model_high and model_low have different "
                                         r"latent spaces \(Wan21 vs SD15\)"):
        two_expert(node, high, sd15[0], cond, latent, core_sampler("euler"), sigmas, 2)
