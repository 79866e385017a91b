"""CUDA-graph helper: keys, LRU, fallbacks and one-line logging on the CPU (fake capturer); real capture on GPU."""
from __future__ import annotations

import logging

import pytest
import torch

from fewstep.kernels import GraphCache, GraphKey, allocator_backend, capture_allowed

needs_cuda = lambda f: pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: real CUDA graph capture/replay")(f))  # noqa: E731


class FakeCapturer:
    """Emulates a graph on the CPU: 'capture' runs fn once into static outputs; 'replay' reruns it on the static
    inputs and writes into the same static output tensors (what a real replay does)."""

    def __init__(self, fail=None):
        self.fail = fail
        self.captures = 0
        self.warmups = 0

    def unsupported_reason(self, leaves):
        return None

    def capture(self, fn, args, kwargs, warmup_runs):
        self.captures += 1
        for _ in range(warmup_runs):
            self.warmups += 1
            fn(*args, **kwargs)
        if self.fail is not None:
            raise self.fail
        static_out = fn(*args, **kwargs)

        def replay():
            new = fn(*args, **kwargs)
            if isinstance(static_out, torch.Tensor):
                static_out.copy_(new)
            else:
                for s, t in zip(static_out, new):
                    s.copy_(t)

        return replay, static_out, None


def unet(x, t, context=None, scale=1.0):
    return x * t.view(-1, 1, 1, 1) + context.mean() * scale


def key(shape=(1, 4, 8, 8), patch="p0", cfg=False):
    return GraphKey.from_tensors(torch.zeros(shape), [torch.zeros(1, 77, 8)], cfg=cfg, patch_state=patch)


# ---------------------------------------------------------------------------------------------------- keys / policy
def test_graph_key():
    k1, k2 = key(), key()
    assert k1 == k2 and hash(k1) == hash(k2)
    assert key(patch="p1") != k1 and key(cfg=True) != k1 and key(shape=(2, 4, 8, 8)) != k1
    k = GraphKey.from_tensors(torch.zeros(1, 4, 8, 8, dtype=torch.float16), [torch.zeros(1, 154, 8), (1, 1280), None],
                              cfg=1, patch_state=("uuid", 3))
    assert k.cond_shapes == ((1, 154, 8), (1, 1280), ()) and k.dtype == torch.float16 and k.device == "cpu" and k.cfg is True
    with pytest.raises(TypeError):
        GraphKey.from_tensors(torch.zeros(1), (), cfg=False, patch_state={"not": "hashable"})


def test_capture_allowed():
    ok = dict(device_type="cuda", model_fully_loaded=True, lowvram=False)
    assert capture_allowed(**ok) == (True, "ok")
    assert capture_allowed(**ok, allocator="native")[0]
    allowed, why = capture_allowed(**ok, allocator="cudaMallocAsync")
    assert allowed and "cudaMallocAsync" in why
    assert not capture_allowed(**ok, allocator="pluggable")[0]
    assert not capture_allowed(**{**ok, "device_type": "cpu"})[0]
    assert not capture_allowed(**{**ok, "device_type": "mps"})[0]
    assert "lowvram" in capture_allowed(**{**ok, "lowvram": True})[1]
    assert not capture_allowed(**{**ok, "model_fully_loaded": False})[0]
    if not torch.cuda.is_available():
        assert allocator_backend() is None


# ---------------------------------------------------------------------------------------------------- CPU fallback
def test_cpu_runs_eagerly_and_logs_once(caplog):
    cache = GraphCache()
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([2.0]), torch.randn(1, 77, 8)
    with caplog.at_level(logging.INFO, logger="fewstep"):
        for _ in range(3):
            out = cache.get_or_capture(key(), unet, (x, t), {"context": c})
            torch.testing.assert_close(out, unet(x, t, context=c))
        cache.get_or_capture(key(patch="other"), unet, (x, t), {"context": c})
    lines = [r for r in caplog.records if r.name == "fewstep"]
    assert len(lines) == 2 and "eagerly" in lines[0].getMessage()
    assert len(cache) == 0 and cache.stats["eager"] == 4 and cache.stats["captures"] == 0


# ---------------------------------------------------------------------------------------------------- fake capture
def test_replay_copies_inputs_and_clones_outputs():
    cap = FakeCapturer()
    cache = GraphCache(capturer=cap)
    c = torch.randn(1, 77, 8)
    outs = []
    for i in range(3):
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([float(i + 1)])
        out = cache.get_or_capture(key(), unet, (x, t), {"context": c, "scale": 0.5})
        torch.testing.assert_close(out, unet(x, t, context=c, scale=0.5))  # eager equivalence
        outs.append(out)
    assert cap.captures == 1 and cap.warmups == 2 and cache.stats["replays"] == 3
    # returned tensors are clones: later replays do not overwrite earlier results
    assert outs[0].data_ptr() != outs[1].data_ptr()
    assert not torch.equal(outs[0], outs[1])


def test_tuple_outputs():
    cache = GraphCache(capturer=FakeCapturer())
    fn = lambda a, b: (a + b, a * b)  # noqa: E731
    a, b = torch.randn(5), torch.randn(5)
    s, p = cache.get_or_capture("k", fn, (a, b))
    assert torch.equal(s, a + b) and torch.equal(p, a * b)


def test_lru_eviction():
    cap = FakeCapturer()
    cache = GraphCache(max_graphs=2, capturer=cap)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 8)
    ka, kb, kc = key(patch="a"), key(patch="b"), key(patch="c")
    for k in (ka, kb, ka, kc):  # touching a makes b the least recently used
        cache.get_or_capture(k, unet, (x, t), {"context": c})
    assert cache.keys() == [ka, kc] and cache.stats["evictions"] == 1 and cap.captures == 3
    cache.get_or_capture(kb, unet, (x, t), {"context": c})  # recaptured, evicts a
    assert cache.keys() == [kc, kb] and cap.captures == 4
    with pytest.raises(ValueError):
        GraphCache(max_graphs=0)


def test_capture_failure_falls_back_once(caplog):
    cap = FakeCapturer(fail=RuntimeError("operation not permitted when stream is capturing\nmore"))
    cache = GraphCache(capturer=cap)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 8)
    with caplog.at_level(logging.INFO, logger="fewstep"):
        for _ in range(3):
            out = cache.get_or_capture(key(), unet, (x, t), {"context": c})
            torch.testing.assert_close(out, unet(x, t, context=c))
    assert cap.captures == 1  # never retried for this key
    lines = [r.getMessage() for r in caplog.records if r.name == "fewstep"]
    assert len(lines) == 1 and "capture failed" in lines[0] and "more" not in lines[0]
    assert cache.stats["failures"] == 1 and cache.stats["eager"] == 3 and len(cache) == 0


class Interrupted(Exception):
    """Stands in for the host's InterruptProcessingException (raised inside the UNet when Cancel is pressed)."""


def test_caller_exceptions_pass_through_capture():
    """Cancel pressed during warm-up/capture is the caller's: it propagates and the key may still capture later;
    before, it was taken for a capture failure, swallowed, and the key never captured again."""
    cap = FakeCapturer(fail=Interrupted("cancelled"))
    cache = GraphCache(capturer=cap, passthrough=(Interrupted,))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 8)
    with pytest.raises(Interrupted):
        cache.get_or_capture(key(), unet, (x, t), {"context": c})
    assert cache.stats["failures"] == 0 and cache.stats["eager"] == 0
    cap.fail = None
    cache.get_or_capture(key(), unet, (x, t), {"context": c})
    assert cap.captures == 2 and len(cache) == 1


def test_thrashing_cache_stops_capturing(caplog):
    """More shapes per step than graphs kept: every graph is evicted unused; after 2 * max_graphs such evictions the
    cache runs eagerly with one warning instead of paying warm-ups and a capture per call. Eviction happens before a
    capture, so at most max_graphs pools are alive."""
    cap = FakeCapturer()
    alive = []

    class Counting(FakeCapturer):
        def capture(self, fn, args, kwargs, warmup_runs):
            alive.append(len(cache))
            return cap.capture(fn, args, kwargs, warmup_runs)
    cache = GraphCache(max_graphs=2, capturer=Counting())
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 8)
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        for step in range(6):
            for k in "abc":  # three shapes per step, two graphs kept
                out = cache.get_or_capture(key(patch=k), unet, (x, t), {"context": c})
                torch.testing.assert_close(out, unet(x, t, context=c))
    assert max(alive) < 2  # a slot is freed before each capture
    assert cache.disabled and cache.stats["wasted"] == 4 and cap.captures == 5 and len(cache) == 0
    assert len([r for r in caplog.records if "capture stopped" in r.getMessage()]) == 1
    ok = GraphCache(max_graphs=2, capturer=FakeCapturer())
    for step in range(6):
        for k in "ab":
            ok.get_or_capture(key(patch=k), unet, (x, t), {"context": c})
    assert not ok.disabled and ok.stats["replays"] == 12 and ok.stats["captures"] == 2
    # one-off shapes over a long session (each evicted unused) never add up while other keys keep hitting
    long = GraphCache(max_graphs=2, capturer=FakeCapturer())
    for i in range(12):
        long.get_or_capture(key(patch="hot"), unet, (x, t), {"context": c})
        long.get_or_capture(key(patch=f"once{i}"), unet, (x, t), {"context": c})
        long.get_or_capture(key(patch="hot"), unet, (x, t), {"context": c})
    assert not long.disabled and long.stats["wasted"] >= 10


def test_log_line_names_a_short_key(caplog):
    cache = GraphCache()
    huge = key(patch=tuple(range(5000)))
    with caplog.at_level(logging.INFO, logger="fewstep"):
        cache.get_or_capture(huge, unet, (torch.randn(1, 4, 8, 8), torch.tensor([1.0])), {"context": torch.ones(1)})
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fewstep"]
    assert len(line) < 300 and "latent (1, 4, 8, 8)" in line


def test_mismatched_inputs_run_eagerly(caplog):
    cache = GraphCache(capturer=FakeCapturer())
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 8)
    cache.get_or_capture("k", unet, (x, t), {"context": c})
    with caplog.at_level(logging.INFO, logger="fewstep"):
        x2 = torch.randn(2, 4, 8, 8)
        out = cache.get_or_capture("k", unet, (x2, torch.tensor([1.0, 2.0])), {"context": c})  # wrong key: shape
        torch.testing.assert_close(out, unet(x2, torch.tensor([1.0, 2.0]), context=c))
        out = cache.get_or_capture("k", unet, (x, t), {"context": c, "scale": 3.0})  # baked constant changed
        torch.testing.assert_close(out, unet(x, t, context=c, scale=3.0))
    assert len([r for r in caplog.records if r.name == "fewstep"]) == 1  # one line per key
    assert cache.stats["eager"] == 2


# ---------------------------------------------------------------------------------------------------- GPU
def _cuda_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, padding=1)).cuda().half()


@needs_cuda
def test_cuda_capture_replay_equals_eager_and_no_sync():
    model = _cuda_model()
    fn = lambda x, t: model(x) * t.view(-1, 1, 1, 1)  # noqa: E731
    cache = GraphCache()
    k = GraphKey.from_tensors(torch.zeros(2, 4, 32, 32, device="cuda", dtype=torch.half), (), cfg=False, patch_state=id(model))
    xs = [torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.half) for _ in range(3)]
    t = torch.tensor([1.0, 0.5], device="cuda", dtype=torch.half)
    with torch.no_grad():
        first = cache.get_or_capture(k, fn, (xs[0], t))
        assert len(cache) == 1 and cache.stats["captures"] == 1
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [cache.get_or_capture(k, fn, (x, t)) for x in xs]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, fn(x, t), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(first, outs[0])
    assert cache.stats["replays"] == 4


@needs_cuda
def test_cuda_sync_inside_capture_falls_back(caplog):
    cache = GraphCache()
    fn = lambda x: x * float(x.sum())  # noqa: E731  (.item()-style host read: illegal during capture)
    x = torch.randn(8, device="cuda")
    with caplog.at_level(logging.INFO, logger="fewstep"):
        for _ in range(2):
            torch.testing.assert_close(cache.get_or_capture("sync", fn, (x,)), fn(x))
    assert len(cache) == 0 and cache.stats["failures"] == 1
    assert len([r for r in caplog.records if r.name == "fewstep"]) == 1
    # the stream still works afterwards
    torch.testing.assert_close((x + 1).cpu(), x.cpu() + 1)


@needs_cuda
def test_cuda_lru_real_graphs():
    model = _cuda_model()
    cache = GraphCache(max_graphs=2)
    with torch.no_grad():
        for hw in (16, 24, 32, 16):
            x = torch.randn(1, 4, hw, hw, device="cuda", dtype=torch.half)
            k = GraphKey.from_tensors(x, (), cfg=False, patch_state=0)
            torch.testing.assert_close(cache.get_or_capture(k, model, (x,)), model(x), atol=1e-3, rtol=1e-3)
    assert len(cache) == 2 and cache.stats["evictions"] == 2 and cache.stats["captures"] == 4
