"""Tier b: CUDA-graph capture glue (nodes/graphs.py) on the real host, exercised on the CPU with an emulated capturer:
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


def test_wrapper_keys_and_replay_equal_eager(tiny, monkeypatch):
    import comfy.patcher_extension as pe
    from fewstep.nodes import graphs
    capturer = EmulatedCapturer()
    unet = tiny.model.diffusion_model
    graphs._CACHES.pop(unet, None)
    graphs.cache_for(unet, capturer)
    opts = {}
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, graphs.WRAPPER_KEY, graphs.diffusion_model_wrapper, opts)
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
