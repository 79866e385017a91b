"""In-process host: CUDA-graph capture glue (nodes/graphs.py) on the real host, exercised on the CPU with an emulated capturer:
the wrapper is installed through model_options (never globally), keys follow shapes/cfg/patch state, and every
fallback runs the UNet eagerly with one log line."""
from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.host


class EmulatedCapturer:
    """'Captures' by running once into static outputs; 'replay' reruns on the static inputs (a real graph's effect)."""

    def __init__(self):
        self.captures = 0

    def unsupported_reason(self, leaves):
        return None

    def capture(self, fn, args, kwargs, warmup_runs):
        self.captures += 1
        static_out = fn(*args, **kwargs)

        def replay():
            static_out.copy_(fn(*args, **kwargs))
        return replay, static_out, None


@pytest.fixture(scope="module")
def tiny(host):
    """A tiny SD1.5-layout UNet inside a real BaseModel + ModelPatcher."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    from tools.standins import TINY_UNET_CONFIG
    cfg = sm.SD15(dict(TINY_UNET_CONFIG))
    model = cfg.get_model({})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def run_unet(patcher, x, sigma, context, transformer_options):
    return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options)


def wrapped(tiny, capturer):
    """A fresh graph cache for the tiny UNet with `capturer`, and transformer options carrying the capture wrapper."""
    import comfy.patcher_extension as pe
    from fewstep.nodes import graphs
    unet = tiny.model.diffusion_model
    graphs._CACHES.pop(unet, None)
    cache = graphs.cache_for(unet, capturer)
    opts = {}
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, graphs.WRAPPER_KEY, graphs.diffusion_model_wrapper, opts)
    return unet, cache, opts


def test_wrapper_keys_and_replay_equal_eager(tiny, monkeypatch):
    from fewstep.nodes import graphs
    capturer = EmulatedCapturer()
    unet, _, opts = wrapped(tiny, capturer)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, 64)
    eager = run_unet(tiny, x, torch.tensor([3.0]), ctx, {})
    out1 = run_unet(tiny, x, torch.tensor([3.0]), ctx, dict(opts))
    out2 = run_unet(tiny, x * 0.5, torch.tensor([1.0]), ctx, dict(opts))  # same key: replay with new inputs
    assert capturer.captures == 1 and len(graphs.cache_for(unet)) == 1
    assert torch.allclose(out1, eager, atol=1e-6)
    assert torch.allclose(out2, run_unet(tiny, x * 0.5, torch.tensor([1.0]), ctx, {}), atol=1e-6)
    run_unet(tiny, torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0]), torch.randn(2, 77, 64), dict(opts))
    assert capturer.captures == 2  # new batch shape -> new graph
    # a LoRA-style patch replaces Parameters -> a new patch state -> a new graph
    m = tiny.clone()
    key = "diffusion_model.out.2.weight"
    m.add_patches({key: ("diff", (torch.ones_like(tiny.model.state_dict()[key]) * 0.01,))}, 1.0, 1.0)
    m.patch_model()
    try:
        patched = run_unet(m, x, torch.tensor([3.0]), ctx, dict(opts))
    finally:
        m.unpatch_model()
    assert capturer.captures == 3
    assert not torch.allclose(patched, out1)


def test_eager_fallbacks_log_once(tiny, caplog):
    from fewstep.nodes import graphs
    assert graphs.eager_reason(object(), {}, {}) == "a ControlNet is attached"
    assert "attention patches" in graphs.eager_reason(None, {"patches": {"attn1_patch": [1]}}, {})
    assert graphs.eager_reason(None, {}, {}) is None
    graphs._LOGGED.clear()
    caplog.set_level(logging.INFO, logger="fewstep")

    class Wrapped:  # what the sampler sees: KSamplerX0Inpaint-like, .inner_model.model_patcher
        class inner_model:
            model_patcher = tiny

    extra = {"model_options": {"transformer_options": {}}}
    for _ in range(3):
        assert graphs.with_graph_capture(Wrapped, torch.zeros(1, 4, 8, 8), extra) is extra
    lines = [r for r in caplog.records if "CUDA graph capture off" in r.getMessage()]
    assert len(lines) == 1 and "cpu" in lines[0].getMessage()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: real CUDA graph capture inside the host")
def test_real_capture_in_host_sampling_gpu(host, standin_dir):
    """On a GPU, through the real host: the fused sampler captures the SD1.5 stand-in's UNet call once and replays it
    on every later step; its latent equals the unfused one within the fused path's tolerance (1e-5 fp32 / 1e-2 fp16,
    times the latent scale when that exceeds 1); a fused LoRA (new weight Parameters) gets its own graph and a
    different result; back on the base model the first result comes back. Run under both allocators by
    dev/offline_gpu.py (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync and native)."""
    import comfy.samplers
    import comfy.sd
    import folder_paths
    from fewstep.kernels import consistency_step
    from fewstep.nodes import engine, graphs
    from fewstep.nodes import lora as L
    from fewstep.samplers import schedules

    assert consistency_step.triton_available(), "Triton is not importable on this GPU machine"
    model = comfy.sd.load_checkpoint_guess_config(str(standin_dir / "checkpoints" / "fewstep-standin-sd15.safetensors"),
                                                  output_vae=False, output_clip=False)[0]
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    sigmas = schedules.timesteps_to_sigmas(schedules.lcm_timesteps(4), model.get_model_object("model_sampling"))

    def run(m, fused):
        latent = torch.zeros(1, 4, 64, 64)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(cond, cond)
        guider.set_cfg(1.0)
        out = guider.sample(noise, latent, engine.make_sampler("tcd", gamma=0.3, fused=fused), sigmas,
                            disable_pbar=True, seed=5)
        return out.float().cpu()

    unet = model.model.diffusion_model
    eager = run(model, "off")
    graphs._CACHES.pop(unet, None)
    fused = run(model, "on")
    stats = dict(graphs.cache_for(unet).stats)
    print(f"allocator {graphs.allocator_backend()}, UNet dtype {model.model.get_dtype()}, graph stats {stats}")
    assert stats["failures"] == 0 and stats["captures"] == 1, f"capture did not happen cleanly: {stats}"
    assert stats["replays"] >= len(sigmas) - 1 and stats["eager"] == 0, f"not every step replayed: {stats}"
    tol = (1e-5 if model.model.get_dtype() == torch.float32 else 1e-2) * max(1.0, eager.abs().max().item())
    err = (fused - eager).abs().max().item()
    print(f"fused (captured) vs unfused (eager): max |diff| {err:.3g}, tolerance {tol:.3g}")
    assert err <= tol

    folder_paths.add_model_folder_path("loras", str(standin_dir / "loras"))
    with_lora_model, _, _ = L.fuse(model, "lcm-lora-sd15-standin.safetensors", 1.0, [])
    with_lora = run(with_lora_model, "on")
    stats2 = graphs.cache_for(unet).stats
    assert stats2["captures"] == 2 and stats2["failures"] == 0, f"a LoRA must get its own graph: {stats2}"
    assert (with_lora - fused).abs().max().item() > 1e-3, "the LoRA changed nothing: a stale graph was replayed"
    again = run(model, "on")
    assert (again - fused).abs().max().item() <= tol, "the base model's result did not come back after the LoRA"


def test_cancel_during_capture_reaches_the_host(tiny):
    """The host raises InterruptProcessingException inside the UNet when Cancel is pressed; during a capture it
    propagates (the cache is built with it as passthrough) instead of being logged as a failed capture."""
    import comfy.model_management as mm
    from fewstep.nodes import graphs

    class Cancelling(EmulatedCapturer):
        def capture(self, fn, args, kwargs, warmup_runs):
            raise mm.InterruptProcessingException()
    unet, cache, opts = wrapped(tiny, Cancelling())
    with pytest.raises(mm.InterruptProcessingException):
        run_unet(tiny, torch.randn(1, 4, 8, 8), torch.tensor([3.0]), torch.randn(1, 77, 64), dict(opts))
    assert cache.stats["failures"] == 0 and not cache._failed
    graphs._CACHES.pop(unet, None)


def test_attention_override_and_object_patches_are_in_the_key(tiny):
    """Clones share the UNet (and its parameter addresses): a clone with an attention override, or an object patch on
    the UNet, must not replay another clone's graph."""
    from fewstep.nodes import graphs
    capturer = EmulatedCapturer()
    unet, _, opts = wrapped(tiny, capturer)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    run_unet(tiny, x, torch.tensor([3.0]), ctx, dict(opts))
    calls = []

    def override(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)
    run_unet(tiny, x, torch.tensor([3.0]), ctx, {**opts, "optimized_attention_override": override})
    assert capturer.captures == 2 and calls, "the override clone replayed the plain clone's graph"
    a, b = tiny.clone(), tiny.clone()
    b.add_object_patch("diffusion_model.out", torch.nn.Identity())
    assert graphs.patcher_fingerprint(a) != graphs.patcher_fingerprint(b)
    assert graphs.patcher_fingerprint(a) == graphs.patcher_fingerprint(tiny.clone())
    graphs._CACHES.pop(unet, None)


def test_stale_graphs_are_released(tiny, host):
    """Graphs captured over weight addresses that moved (a LoRA patch, an offload/reload) can never replay: they are
    dropped at the next sampling start, and a UNet whose weights left the device loses all its graphs."""
    from fewstep.nodes import graphs
    capturer = EmulatedCapturer()
    unet, cache, opts = wrapped(tiny, capturer)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    run_unet(tiny, x, torch.tensor([3.0]), ctx, dict(opts))
    m = tiny.clone()
    key = "diffusion_model.out.2.weight"
    m.add_patches({key: ("diff", (torch.ones_like(tiny.model.state_dict()[key]) * 0.01,))}, 1.0, 1.0)
    m.patch_model()
    try:
        run_unet(m, x, torch.tensor([3.0]), ctx, dict(opts))
        assert len(cache) == 2
        graphs.release_stale_graphs(unet, x.device)  # the unpatched graph's weights are not the current ones
        assert len(cache) == 1
    finally:
        m.unpatch_model()
    graphs.release_stale_graphs(unet, x.device)  # back to the original weights: the patched graph is stale now
    assert len(cache) == 0

    other = torch.nn.Linear(2, 2, device="meta")  # a UNet whose weights are elsewhere (offloaded)
    other_cache = graphs.cache_for(other, EmulatedCapturer())
    other_cache.get_or_capture("k", lambda a: a * 2, (torch.ones(2),))
    assert len(other_cache) == 1
    graphs.release_stale_graphs(unet, x.device)
    assert len(other_cache) == 0
    graphs._CACHES.pop(unet, None)
    graphs._CACHES.pop(other, None)
