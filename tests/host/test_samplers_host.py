"""In-process host: the pack's samplers inside the real host's sampling path (comfy.sample / KSAMPLER / registry)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

SIZE = 8  # latent side: the stand-in SD1.5 UNet is real-size, keep it cheap


@pytest.fixture(scope="session")
def sd15(host, standin_dir):
    import comfy.sd
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"))[:3]
    tokens = clip.tokenize("a red boat on a lake")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return model, [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="session")
def registered(host):
    from fewstep.nodes import registry
    registry.register()
    registry.register()  # idempotent
    return registry


@pytest.fixture
def replay_noise(monkeypatch):
    """Make core and fewstep draw the same step noise: both look default_noise_sampler up at call time."""
    import comfy.k_diffusion.sampling as K

    def factory(x, seed=None):
        g = torch.Generator().manual_seed(1234)
        return lambda *_: torch.randn(x.shape, generator=g).to(x)

    monkeypatch.setattr(K, "default_noise_sampler", factory)


def run(model, cond, sampler, scheduler, steps, seed=7, batch=1, cfg=1.0, denoise=1.0, latent=None):
    import comfy.sample
    latent = torch.zeros(batch, 4, SIZE, SIZE) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, cond, cond, latent,
                               denoise=denoise, seed=seed, disable_pbar=True)


def test_registry_names_in_place_and_idempotent(registered):
    import comfy.samplers as S
    import nodes
    for name in ("fewstep_lcm", "fewstep_tcd", "fewstep_pcm", "fewstep_auto"):
        assert S.KSAMPLER_NAMES.count(name) == 1 and S.SAMPLER_NAMES.count(name) == 1
    assert S.KSampler.SAMPLERS is S.SAMPLER_NAMES and S.KSampler.SCHEDULERS is S.SCHEDULER_NAMES
    assert "fewstep_tcd" in nodes.KSampler.INPUT_TYPES()["required"]["sampler_name"][0]
    assert "fewstep_lcm50" in nodes.KSampler.INPUT_TYPES()["required"]["scheduler"][0]
    assert "lcm" in S.SAMPLER_NAMES and S.SAMPLER_NAMES.count("lcm") == 1  # core name untouched


def test_lcm_schedule_is_diffusers_grid(sd15, registered):
    import comfy.samplers
    model, _ = sd15
    ms = model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "fewstep_lcm50", 4)
    assert ms.timestep(sig[:-1]).tolist() == [999, 759, 499, 259] and float(sig[-1]) == 0.0


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_txt2img_equals_core_lcm_recipe(sd15, registered, replay_noise, steps):
    """fewstep_lcm on the plain model == core lcm + ModelSamplingDiscrete(lcm) + simple (fp32, 1e-4 relative)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    model, cond = sd15
    core_model = ModelSamplingDiscrete().patch(model, "lcm", False)[0]
    ref = run(core_model, cond, "lcm", "simple", steps)
    ours = run(model, cond, "fewstep_lcm", "fewstep_lcm50", steps)
    assert torch.isfinite(ours).all()
    # The stand-in's x0 at sigma 14.6 reaches ~1e2 (its eps is random, not the noise): compare at the latent's scale.
    scale = max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() < 1e-4 * scale


def test_tcd_gamma_from_settings_patch_changes_result_and_input_untouched(sd15, registered):
    from fewstep.nodes.presets import FewStepSettings
    model, cond = sd15
    before = dict(model.model_options.get("transformer_options", {}))
    m0 = FewStepSettings.execute(model, "none", 0.0, "x0", "cpu", "off", 0)[0]
    m1 = FewStepSettings.execute(model, "none", 0.9, "x0", "cpu", "off", 0)[0]
    assert model.model_options.get("transformer_options", {}) == before
    a = run(m0, cond, "fewstep_tcd", "fewstep_lcm50", 3)
    b = run(m1, cond, "fewstep_tcd", "fewstep_lcm50", 3)
    c = run(m1, cond, "fewstep_tcd", "fewstep_lcm50", 3)
    assert not torch.allclose(a, b) and torch.equal(b, c)


def test_auto_sampler_and_scheduler_follow_preset(sd15, registered):
    import comfy.samplers
    from fewstep.nodes.presets import FewStepSettings
    model, cond = sd15
    m = FewStepSettings.execute(model, "PCM smallcfg 4-step", -1.0, "x0", "cpu", "off", 0)[0]
    ms = m.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "fewstep_auto", 4)
    assert ms.timestep(sig[:-1]).tolist() == [999, 739, 499, 239]
    # the preset travels in model_options only: no model sampling is patched or tagged, the input model is untouched
    assert "model_sampling" not in m.object_patches and not hasattr(ms, "fewstep_preset")
    assert m.model_options["transformer_options"]["fewstep"]["preset"] == "PCM smallcfg 4-step"
    assert "fewstep" not in model.model_options.get("transformer_options", {})
    out = run(m, cond, "fewstep_auto", "fewstep_auto", 4)
    assert torch.isfinite(out).all()


def test_batch_size_never_changes_an_image(sd15, registered):
    model, cond = sd15
    one = run(model, cond, "fewstep_tcd", "fewstep_lcm50", 3, batch=1)
    two = run(model, cond, "fewstep_tcd", "fewstep_lcm50", 3, batch=2)
    three = run(model, cond, "fewstep_tcd", "fewstep_lcm50", 3, batch=3)
    # equal up to batched-matmul rounding (values reach ~1e2); whole-batch step noise would differ by O(1)
    assert torch.allclose(three[:1], one, rtol=1e-5, atol=1e-3)
    assert torch.allclose(three[:2], two, rtol=1e-5, atol=1e-3)
    assert not torch.allclose(three[1], three[0])


def test_callback_gets_x0_every_step_and_interrupt_stops(sd15, registered):
    import comfy.model_management as mm
    import comfy.samplers
    from fewstep.nodes import engine
    model, cond = sd15
    seen = []

    def cb(step, x0, x, total):
        seen.append(step)
        if step == 1:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    sampler = engine.make_sampler("tcd", gamma=0.5)
    ms = model.get_model_object("model_sampling")
    from fewstep.samplers import schedules
    sigmas = schedules.timesteps_to_sigmas(schedules.lcm_timesteps(6), ms)
    latent = torch.zeros(1, 4, SIZE, SIZE)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    with pytest.raises(mm.InterruptProcessingException):
        guider.sample(noise, latent, sampler, sigmas, callback=cb, disable_pbar=True, seed=3)
    mm.interrupt_current_processing(False)
    assert seen == [0, 1]


def test_flow_model_rejected_with_clear_error(sd15, registered):
    import comfy.model_sampling
    from fewstep.nodes.sampling import FewStepScheduleLCM

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    model, _ = sd15
    m = model.clone()
    m.add_object_patch("model_sampling", Flow(m.model.model_config))
    with pytest.raises(ValueError, match="FewStep LCM Schedule.*discrete VP"):
        FewStepScheduleLCM.execute(m, 4, 1.0, "50")


def assert_fused_matches(fused, unfused, model):
    """Fused vs unfused latents. On the CPU (Triton interpreter) both loops run the same fp32 ops in the same order:
    bit-identical. On a GPU the compiled kernel contracts to FMAs, so the fused path's bound applies: 1e-5 for an fp32
    UNet, 1e-2 for fp16/bf16, scaled by the latent's magnitude where that exceeds 1 (the stand-in's reaches ~1e2)."""
    err = (fused.float() - unfused.float()).abs().max().item()
    if not torch.cuda.is_available():
        assert err == 0.0, f"fused differs from unfused by {err} on the CPU"
        return
    tol = (1e-5 if model.model.get_dtype() == torch.float32 else 1e-2) * max(1.0, unfused.abs().max().item())
    assert err <= tol, f"fused differs from unfused by {err} (tolerance {tol})"


@pytest.mark.parametrize("split", [False, True], ids=["to-sigma-0", "split-sigmas"])
def test_fused_path_equals_unfused_through_interpreter(sd15, registered, monkeypatch, split):
    """The fused loop (Triton interpreter on CPU) gives the unfused image with the same seed, also for a split
    schedule (SplitSigmas' first half: the last step re-noises to a sigma above 0)."""
    pytest.importorskip("triton")
    from fewstep.kernels import consistency_step
    from fewstep.kernels import loop as kernel_loop
    from fewstep.nodes import engine
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FEWSTEP_ALLOW_TRITON_INTERPRETER", "1")
    monkeypatch.setattr(kernel_loop, "use_fused", lambda mode, x: mode == "on")
    assert consistency_step.fused_backend(torch.zeros(2)) == "triton"
    model, cond = sd15
    import comfy.samplers
    ms = model.get_model_object("model_sampling")
    from fewstep.samplers import schedules
    sigmas = schedules.timesteps_to_sigmas(schedules.lcm_timesteps(3), ms)
    if split:
        sigmas = sigmas[:-1]
        assert float(sigmas[-1]) > 0
    from fewstep.kernels import loop
    real_loop, used = loop.sample_fused, []
    monkeypatch.setattr(loop, "sample_fused", lambda *a, **k: used.append(1) or real_loop(*a, **k))
    outs = []
    for fused in ("off", "on"):
        latent = torch.zeros(1, 4, SIZE, SIZE)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(cond, cond)
        guider.set_cfg(1.0)
        outs.append(guider.sample(noise, latent, engine.make_sampler("tcd", gamma=0.4, fused=fused), sigmas,
                                  disable_pbar=True, seed=5))
    assert used == [1], "fused=on must run the fused loop (no silent fallback), once"
    assert_fused_matches(outs[1], outs[0], model)


@pytest.mark.parametrize("fused", ["off", "on"])
def test_inpaint_mask_keeps_unmasked_latent(sd15, registered, monkeypatch, fused):
    """Masks work through the host's KSamplerX0Inpaint wrapper: where the mask is 0 the latent is kept. Also on the
    fused loop (Triton interpreter on the CPU), which must give the unfused result."""
    import comfy.samplers
    from fewstep.nodes import engine
    from fewstep.samplers import schedules
    if fused == "on":
        pytest.importorskip("triton")
        from fewstep.kernels import loop as kernel_loop
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FEWSTEP_ALLOW_TRITON_INTERPRETER", "1")
        monkeypatch.setattr(kernel_loop, "use_fused", lambda mode, x: mode == "on")
    model, cond = sd15
    ms = model.get_model_object("model_sampling")
    sigmas = schedules.timesteps_to_sigmas(schedules.lcm_timesteps(2), ms)
    latent = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., SIZE // 2:] = 1.0
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    out = guider.sample(noise, latent, engine.make_sampler("lcm", fused=fused), sigmas, denoise_mask=mask,
                        disable_pbar=True, seed=1)
    assert torch.allclose(out[..., : SIZE // 2], latent[..., : SIZE // 2], atol=1e-4)
    assert not torch.allclose(out[..., SIZE // 2:], latent[..., SIZE // 2:], atol=1e-2)
    if fused == "on":
        ref = guider.sample(noise, latent, engine.make_sampler("lcm", fused="off"), sigmas, denoise_mask=mask,
                            disable_pbar=True, seed=1)
        assert_fused_matches(out, ref, model)


def test_too_short_sigmas_rejected(sd15, registered):
    from fewstep.nodes import engine
    model, _ = sd15
    with pytest.raises(ValueError, match="fewstep lcm sampler: the sigmas input has 1 value"):
        engine.make_sampler("lcm").sampler_function(None, torch.zeros(1, 4, SIZE, SIZE), torch.tensor([1.0]))


def distilled_eps():
    """Core ModelSamplingDiscrete(lcm)'s model sampling class (50 kept timesteps), eps prediction."""
    import comfy.model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscreteDistilled

    class Distilled(ModelSamplingDiscreteDistilled, comfy.model_sampling.EPS):
        pass
    return Distilled


def test_distilled_lcm_table_uses_the_full_table_off_grid(host):
    """On core's ModelSamplingDiscrete(lcm) table (50 kept timesteps) TCD's off-grid targets and the diffusers final
    step (s = 0) read the full table, as diffusers does: the coefficients equal those on the plain model sampling.
    A distilled table the full one cannot be rebuilt for (zsnr) refuses final_step='diffusers' with a clear error."""
    import comfy.model_sampling

    class Plain(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    from fewstep.samplers import schedules
    from fewstep.samplers.parametrisation import parametrisation as vp
    from fewstep.samplers.step import Step, step_coefficients
    Distilled = distilled_eps()
    plain, distilled = Plain(), Distilled()
    assert distilled.sigmas.numel() == 50
    ts = schedules.lcm_timesteps(4)
    sigmas = torch.cat([plain.sigma(torch.tensor(ts, dtype=torch.float32)), torch.zeros(1)])
    for gamma in (0.3, 0.7):
        a = step_coefficients(sigmas, vp(plain), Step(gamma), final_step="diffusers")
        b = step_coefficients(sigmas, vp(distilled), Step(gamma), final_step="diffusers")
        assert torch.allclose(a.sigma_s, b.sigma_s, rtol=1e-5, atol=0), (gamma, a.sigma_s, b.sigma_s)
        assert torch.equal(a.t, b.t) and torch.equal(a.s, b.s)
    assert abs(b.sigma_s[-1].item() - plain.sigma(torch.tensor(0.0)).item()) < 1e-6  # 0.0292, not sigma(19)
    assert abs(distilled.sigma(torch.tensor(0.0)).item() - plain.sigma(torch.tensor(19.0)).item()) < 1e-6
    zsnr = Distilled(zsnr=True)
    with pytest.raises(ValueError, match=r"final_step='diffusers' needs the noise level at timestep 0.*"
                                         r"use final_step='x0'"):
        step_coefficients(sigmas, vp(zsnr), Step(0.3), final_step="diffusers")
    step_coefficients(sigmas, vp(zsnr), Step(0.3), final_step="x0")  # the default stays usable
    # LCM re-noises D itself (clean intermediate): its diffusers and x0 final steps are the same step, so a table
    # without timestep 0 (AnimateDiff-Evolved's "lcm avg(sqrt_linear,linear)", zsnr) does not refuse it
    lcm = Step(1.0, True, True)
    d, x = (step_coefficients(sigmas, vp(zsnr), lcm, final_step=f) for f in ("diffusers", "x0"))
    for f in ("a_x", "a_d", "a_z", "b_x", "b_d"):
        assert torch.equal(getattr(d, f), getattr(x, f)), f


def test_preset_strength_follows_each_grids_img2img_rule(registered):
    """FewStep Preset's strength: trailing and PCM presets keep the last int(steps*strength) of their own timesteps
    (it was ignored there); LCM/TCD cut the original grid; a fixed-timestep preset refuses strength < 1."""
    from fewstep.samplers import presets as table
    pt = table.preset_timesteps
    assert pt(table.get_preset("SDXL-Lightning 4-step"), 4, 0.5) == [499, 249]
    assert pt(table.get_preset("Hyper-SD 8-step"), 8, 0.5) == [499, 374, 249, 124]
    full = pt(table.get_preset("PCM smallcfg 4-step"), 4, 1.0)
    assert pt(table.get_preset("PCM smallcfg 4-step"), 4, 0.5) == full[2:] and len(full) == 4
    assert pt(table.get_preset("TCD"), 4, 0.5) == [499, 379, 259, 139]
    fixed = next(p for p in table.PRESETS if p.schedule == "fixed")
    assert pt(fixed, 1, 1.0) == list(fixed.fixed_timesteps)
    with pytest.raises(ValueError, match=r"has no img2img rule; set strength to 1.0"):
        pt(fixed, 1, 0.5)


def test_pcm_presets_use_the_sdxl_solver_size_on_sdxl(registered):
    """PCM's SDXL training script uses 40 DDIM timesteps (its phase edges are the card's trailing grid), the SD1.5
    scripts 50; the preset follows the model's base, and FewStep Settings carries the base to fewstep_auto."""
    from fewstep.samplers import presets as table, schedules
    p = table.get_preset("PCM smallcfg 4-step")
    assert table.preset_timesteps(p, 4, base="sd15") == [999, 739, 499, 239]
    assert table.preset_timesteps(p, 4, base="sdxl") == schedules.trailing_timesteps(4) == [999, 749, 499, 249]
    assert table.preset_timesteps(p, 8, base="sdxl") == schedules.trailing_timesteps(8)


def test_settings_carry_the_model_base_to_the_auto_scheduler(sd15, registered):
    import comfy.samplers
    from fewstep.nodes import presets as P
    model, _ = sd15
    m = P.FewStepSettings.execute(model, "PCM smallcfg 4-step", -1.0, "x0", "cpu", "off", 0).args[0]
    ms = m.get_model_object("model_sampling")
    assert m.model_options["transformer_options"]["fewstep"]["base"] == "sd15"
    assert "fewstep" not in model.model_options.get("transformer_options", {})
    sig = comfy.samplers.KSampler(m, steps=4, device="cpu", sampler="fewstep_auto", scheduler="fewstep_auto").sigmas
    want = [999, 739, 499, 239]
    assert [int(ms.timestep(s)) for s in sig[:-1]] == want


def test_auto_sampler_says_when_settings_gamma_is_not_used(sd15, registered, caplog):
    """FewStep Settings' gamma with a non-TCD preset: fewstep_auto samples the preset's deterministic kind and says
    the gamma is unused (FewStep Preset refuses the same request); fewstep_tcd uses it."""
    import logging
    from fewstep.nodes.presets import FewStepSettings
    model, cond = sd15
    m = FewStepSettings.execute(model, "Hyper-SD 2-step", 0.5, "x0", "cpu", "off", 0)[0]
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        run(m, cond, "fewstep_auto", "fewstep_auto", 2)
    assert "FewStep Settings' gamma 0.5 is not used (pick sampler fewstep_tcd to use it)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        run(m, cond, "fewstep_tcd", "fewstep_auto", 2)
    assert "is not used" not in caplog.text


def test_scheduler_errors_explain_ksampler_denoise(sd15, registered, caplog):
    """A low KSampler denoise makes the host ask for int(steps/denoise) steps; the error says so instead of only
    naming a step count the user never typed. A fixed-timestep preset says it ignores steps and denoise."""
    import logging
    import comfy.samplers
    from fewstep.nodes.presets import FewStepSettings
    model, _ = sd15
    ms = model.get_model_object("model_sampling")
    with pytest.raises(ValueError, match=r"fewstep scheduler: .*int\(steps / denoise\)"):
        comfy.samplers.calculate_sigmas(ms, "fewstep_lcm50", 80)
    m = FewStepSettings.execute(model, "Hyper-SDXL 1-step UNet", -1.0, "x0", "cpu", "off", 0)[0]
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "fewstep_auto", 4)
    assert len(sig) == 2 and "always runs the timesteps [800]" in caplog.text


def test_distilled_table_warns_when_it_moves_a_grid(host, caplog):
    """Trailing timesteps on a ModelSamplingDiscrete(lcm) table land on its 50-step grid (749 -> 739): the log says
    what the UNet will be told and which node to remove; an LCM grid on it (on-grid) is silent."""
    import logging
    from fewstep.samplers import schedules
    ms = distilled_eps()()
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        schedules.timesteps_to_sigmas(schedules.lcm_timesteps(4), ms)
    assert "cannot place" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        schedules.timesteps_to_sigmas(schedules.trailing_timesteps(4), ms)
    assert "cannot place timesteps [999, 749, 499, 249]: the UNet will be told [999, 739, 499, 239]" in caplog.text
    assert "ModelSamplingDiscrete(lcm)" in caplog.text


def test_lightning_one_step_asks_for_x0_sampling(sd15, registered, caplog):
    """SDXL-Lightning's 1-step checkpoint predicts x0: on an eps model the preset nodes say which node to add; with
    ModelSamplingDiscrete(x0) they are silent."""
    import logging
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from fewstep.nodes.presets import FewStepPreset, FewStepSettings
    model, _ = sd15
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        FewStepPreset.execute(model, "SDXL-Lightning 1-step", 0, 1.0, -1.0)
        FewStepSettings.execute(model, "SDXL-Lightning 1-step", -1.0, "x0", "cpu", "off", 0)
    assert caplog.text.count("add ModelSamplingDiscrete with sampling 'x0'") == 2
    caplog.clear()
    x0 = ModelSamplingDiscrete().patch(model, "x0", False)[0]
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        FewStepPreset.execute(x0, "SDXL-Lightning 1-step", 0, 1.0, -1.0)
        FewStepPreset.execute(model, "SDXL-Lightning 4-step", 0, 1.0, -1.0)
    assert "ModelSamplingDiscrete" not in caplog.text


def test_dropdown_names_and_sampler_nodes_run_the_named_samplers(registered):
    """One sampler path: fewstep_lcm / _tcd / _pcm and the SAMPLER nodes call samplers.lcm.sample_lcm etc. (with the
    host's noise and graph capture passed in by engine.for_host); fewstep_auto picks one by the preset."""
    import comfy.k_diffusion.sampling as K
    from fewstep.nodes import engine
    from fewstep.samplers import SAMPLERS
    from fewstep.samplers.lcm import sample_lcm
    from fewstep.samplers.pcm import sample_pcm
    from fewstep.samplers.tcd import sample_tcd
    assert K.sample_fewstep_lcm.__wrapped__ is sample_lcm and K.sample_fewstep_tcd.__wrapped__ is sample_tcd
    assert K.sample_fewstep_pcm.__wrapped__ is sample_pcm
    for kind, fn in SAMPLERS.items():
        assert engine.make_sampler(kind).sampler_function.__wrapped__ is fn


def _swap_to_lcm_table(m, zsnr=False):
    """What AnimateDiff-Evolved's loader does with beta_schedule lcm/autoselect, done by core's node: a new model
    sampling object (the distilled 50-step LCM table) patched onto a clone."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    return ModelSamplingDiscrete().patch(m, "lcm", zsnr)[0]


def test_preset_survives_a_model_sampling_swap_in_either_order(sd15, registered):
    """FewStep Settings keeps its preset in model_options only, so a node that replaces the model sampling after it
    keeps it: KSampler with fewstep_auto works with Settings -> ModelSamplingDiscrete and with the reverse order,
    gives the same image both ways, and the image of fewstep_lcm + fewstep_lcm50 (the LCM-LoRA preset's sampler and
    grid) on the same model."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    from fewstep.nodes.presets import FewStepSettings
    model, cond = sd15

    def settings(m):
        return FewStepSettings.execute(m, "LCM-LoRA", -1.0, "x0", "cpu", "off", 0)[0]

    after, before = _swap_to_lcm_table(settings(model)), settings(_swap_to_lcm_table(model))
    outs = []
    for m in (after, before):
        ms = m.get_model_object("model_sampling")
        assert ms.sigmas.numel() == 50 and ms is not model.get_model_object("model_sampling")
        sig = comfy.samplers.KSampler(m, steps=4, device="cpu", sampler="fewstep_auto", scheduler="fewstep_auto").sigmas
        assert ms.timestep(sig[:-1]).tolist() == [999, 759, 499, 259]
        basic = BasicScheduler.execute(m, "fewstep_auto", 4, 1.0)[0]  # SamplerCustom's scheduler node finds it too
        assert torch.equal(basic, sig.cpu())
        outs.append(run(m, cond, "fewstep_auto", "fewstep_auto", 4))
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], run(after, cond, "fewstep_lcm", "fewstep_lcm50", 4))


def test_lcm_diffusers_final_step_on_a_table_without_timestep_0(sd15, registered):
    """final_step='diffusers' is refused only where it would differ from 'x0': on a distilled table that holds no
    timestep 0, the LCM preset (clean intermediate: the same final step) samples and equals the x0 result, while a
    TCD preset (whose diffusers final step keeps sigma(0) of noise) is refused with the fix in the message."""
    from fewstep.nodes.presets import FewStepSettings
    model, cond = sd15

    def settings(m, preset, final_step):
        return FewStepSettings.execute(m, preset, -1.0, final_step, "cpu", "off", 0)[0]

    diffusers = run(_swap_to_lcm_table(settings(model, "LCM-LoRA", "diffusers"), zsnr=True), cond, "fewstep_auto",
                    "fewstep_auto", 2)
    x0 = run(_swap_to_lcm_table(settings(model, "LCM-LoRA", "x0"), zsnr=True), cond, "fewstep_auto", "fewstep_auto", 2)
    assert torch.isfinite(diffusers).all() and torch.equal(diffusers, x0)
    with pytest.raises(ValueError, match=r"final_step='diffusers' needs the noise level at timestep 0"):
        run(_swap_to_lcm_table(settings(model, "TCD", "diffusers"), zsnr=True), cond, "fewstep_auto", "fewstep_auto", 2)


def test_host_noise_sampler_replaced_during_a_run_is_used(sd15, registered, monkeypatch):
    """When something replaces the host's default_noise_sampler (AnimateDiff-Evolved does), the stochastic steps draw
    from it, once per stochastic step and in step order, as core's samplers would; a deterministic sampler draws
    nothing from it."""
    import comfy.k_diffusion.sampling as K
    model, cond = sd15
    calls = []

    def replaced(x, seed=None):
        g = torch.Generator().manual_seed(int(seed))

        def draw(sigma, sigma_next):
            calls.append(float(sigma))
            return torch.randn(x.shape, generator=g).to(x)
        return draw

    plain = run(model, cond, "fewstep_tcd", "fewstep_lcm50", 3)
    monkeypatch.setattr(K, "default_noise_sampler", replaced)
    patched = run(model, cond, "fewstep_tcd", "fewstep_lcm50", 3)
    assert len(calls) == 2 and calls[0] > calls[1] and not torch.equal(plain, patched)
    calls.clear()
    run(model, cond, "fewstep_pcm", "fewstep_pcm50", 3)
    assert calls == []
