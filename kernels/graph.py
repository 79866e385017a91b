"""CUDA-graph capture of a model call (the UNet forward), with an eager fallback. Host-agnostic: no ``comfy``.

Usage (the host decides *whether* to capture from plain facts, then routes each call through the cache)::

    ok, why = capture_allowed(device_type=x.device.type, model_fully_loaded=..., lowvram=...,
                              allocator=allocator_backend())
    key = GraphKey.from_tensors(x, [c_crossattn, y], cfg=cfg > 1, patch_state=(patcher.patches_uuid, version))
    out = cache.get_or_capture(key, unet_fn, (x, t), {"context": c_crossattn, "y": y}) if ok else unet_fn(...)

Pitfalls handled here: every tensor input is copied into a static buffer before replay
(static addresses); outputs are cloned (the next replay overwrites them); 2 warm-up runs on a side stream before
capture (cuBLAS workspaces, cudnn/Triton autotune, lazy init); capture on torch's non-default capture stream;
syncs or any other error during warm-up/capture -> eager, one log line per key, never retried for that key,
except the caller's ``passthrough`` exceptions (e.g. the host's interrupt), which propagate; at most ``max_graphs``
graphs alive (each holds one forward's activation pool; the least recently used is evicted *before* a capture);
a cache whose graphs keep being evicted unused (more shapes per step than ``max_graphs``) stops capturing.
What the *key* must encode is the caller's job: latent shape/dtype/device, cond shapes (77-token chunks), cfg on/off
(batch 1 vs 2), and the weight patch state (LoRA patches replace Parameters, and a graph bakes weight pointers).
Non-tensor inputs are baked into the graph; if one differs from the captured value the call runs eagerly.

Allocators: under the native allocator each graph gets a private memory pool. Under ``cudaMallocAsync`` (ComfyUI's
default) capture still works: torch records allocations as graph memory nodes in the driver's stream-ordered pool
and ignores private pools, so nothing here changes; memory is returned when the graph is destroyed (evicted).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["GraphKey", "GraphCache", "CudaGraphCapturer", "capture_allowed", "allocator_backend"]

log = logging.getLogger("fewstep")

_KNOWN_ALLOCATORS = ("native", "cudaMallocAsync")


# --------------------------------------------------------------------------------------------------------------------
# Policy from plain facts
# --------------------------------------------------------------------------------------------------------------------
def allocator_backend() -> str | None:
    """``torch.cuda.memory.get_allocator_backend()`` when CUDA is available, else ``None``."""
    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.memory.get_allocator_backend()
    except Exception:
        return None


def capture_allowed(
    *,
    device_type: str,
    model_fully_loaded: bool,
    lowvram: bool,
    allocator: str | None = None,
) -> tuple[bool, str]:
    """Whether CUDA-graph capture of the model call is allowed, and why (one line, for the log).

    Args:
        device_type: ``x.device.type`` of the latent ("cuda", "cpu", "mps", ...).
        model_fully_loaded: the model patcher has every weight on the GPU (no partial load).
        lowvram: lowvram / offload mode is on (``comfy.ops.cast_bias_weight`` streams weights per layer:
            host-driven copies that cannot be captured, ComfyUI #6866).
        allocator: ``allocator_backend()`` / ``torch.cuda.memory.get_allocator_backend()``; ``None`` = unknown,
            treated as native. ``"cudaMallocAsync"`` is allowed (see module docstring); anything else (a pluggable
            allocator) is refused because its graph-pool behaviour is unknown.
    """
    if device_type != "cuda":
        return False, f"device is {device_type!r}; CUDA graphs need a CUDA device"
    if lowvram:
        return False, "lowvram/offload streams weights per layer, which cannot be captured; load the model fully (--highvram/--gpu-only)"
    if not model_fully_loaded:
        return False, "the model is only partially loaded on the GPU; capture needs every weight resident"
    if allocator is not None and allocator not in _KNOWN_ALLOCATORS:
        return False, f"unknown CUDA allocator backend {allocator!r}; capture is only validated for {_KNOWN_ALLOCATORS}"
    if allocator == "cudaMallocAsync":
        return True, "ok (cudaMallocAsync: graph memory lives in the driver's stream-ordered pool)"
    return True, "ok"


# --------------------------------------------------------------------------------------------------------------------
# Key
# --------------------------------------------------------------------------------------------------------------------
def _short(key) -> str:
    """A log-sized name for a key (its full repr lists every weight address)."""
    shape = getattr(key, "shape", None)
    return f"#{hash(key) & 0xFFFFFFFF:08x}" + (f" latent {tuple(shape)}" if shape is not None else "")


def _norm_device(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@dataclass(frozen=True)
class GraphKey:
    """Everything a captured model call depends on besides tensor *values*."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    cond_shapes: tuple[tuple[int, ...], ...]
    cfg: bool
    patch_state: Hashable  # e.g. (patcher uuid, patches version) or a tuple of weight data_ptrs

    def __post_init__(self):
        try:
            hash(self.patch_state)
        except TypeError as e:
            raise TypeError(f"GraphKey: patch_state must be hashable, got {type(self.patch_state).__name__}") from e

    @classmethod
    def from_tensors(
        cls,
        latent: torch.Tensor,
        conds: Iterable[torch.Tensor | Sequence[int] | None] = (),
        *,
        cfg: bool,
        patch_state: Hashable,
    ) -> GraphKey:
        """Key from the latent and the cond tensors (or their shapes; ``None`` entries are kept as ``()``)."""
        shapes = []
        for c in conds:
            if c is None:
                shapes.append(())
            elif isinstance(c, torch.Tensor):
                shapes.append(tuple(c.shape))
            else:
                shapes.append(tuple(int(s) for s in c))
        return cls(tuple(latent.shape), latent.dtype, _norm_device(latent.device), tuple(shapes), bool(cfg), patch_state)


# --------------------------------------------------------------------------------------------------------------------
# Inputs as (tensor leaves, structure): torch's pytree; non-tensor leaves are constants baked into the graph
# --------------------------------------------------------------------------------------------------------------------
def _flatten(obj: Any) -> tuple[list[torch.Tensor], tuple]:
    """``obj``'s tensors, and its structure: the tree spec plus every non-tensor leaf with its position."""
    leaves, spec = pytree.tree_flatten(obj)
    tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
    consts = tuple((i, v) for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor))
    return tensors, (spec, consts)


def _unflatten(structure: tuple, tensors: Sequence[torch.Tensor]):
    spec, consts = structure
    fixed, it = dict(consts), iter(tensors)
    return pytree.tree_unflatten([fixed[i] if i in fixed else next(it) for i in range(spec.num_leaves)], spec)


def _same_structure(a: tuple, b: tuple) -> bool:
    try:
        return bool(a[0] == b[0]) and bool(a[1] == b[1])
    except Exception:  # a constant whose == is not a plain bool
        return False


# --------------------------------------------------------------------------------------------------------------------
# Capturers
# --------------------------------------------------------------------------------------------------------------------
class CudaGraphCapturer:
    """Real CUDA-graph capture. A capturer has two methods; ``GraphCache`` takes another one for tests."""

    def unsupported_reason(self, leaves: Sequence[torch.Tensor]) -> str | None:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        devices = {t.device for t in leaves}
        if not leaves or any(d.type != "cuda" for d in devices):
            return f"inputs are on {sorted(str(d) for d in devices) or 'no tensors'}; capture needs CUDA tensors"
        if len(devices) > 1:
            return f"inputs span several devices {sorted(str(d) for d in devices)}"
        try:
            if torch.cuda.is_current_stream_capturing():
                return "already inside a CUDA graph capture (the call is recorded by the outer graph)"
        except Exception as e:
            return f"cannot query the capture state ({type(e).__name__}: {e})"
        return None

    def capture(self, fn: Callable, args: tuple, kwargs: dict, warmup_runs: int):
        """Warm up on a side stream, capture one call; returns ``(replay, static_out, graph)``."""
        leaves, _ = _flatten((args, kwargs))
        device = leaves[0].device
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup_runs):
                    fn(*args, **kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):  # torch captures on its own non-default stream
                    static_out = fn(*args, **kwargs)
            except Exception:
                try:
                    torch.cuda.synchronize(device)
                except Exception:
                    pass
                raise
        return graph.replay, static_out, graph


class _Entry:
    __slots__ = ("spec", "static_leaves", "replay", "static_out", "handle", "hits")

    def __init__(self, spec, static_leaves, replay, static_out, handle):
        self.spec, self.static_leaves, self.replay, self.static_out, self.handle = spec, static_leaves, replay, static_out, handle
        self.hits = 0  # cache hits after the capturing call


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------
class GraphCache:
    """LRU cache of captured graphs, keyed by ``GraphKey`` (any hashable works).

    ``get_or_capture(key, fn, static_inputs, static_kwargs=None)`` returns what ``fn(*static_inputs,
    **static_kwargs)`` returns: from a replay of the graph captured for ``key`` (inputs copied in, outputs cloned),
    or from an eager call when capture is not possible or failed for that key (one log line per key).
    """

    def __init__(self, max_graphs: int = 4, *, warmup_runs: int = 2, capturer=None, logger: logging.Logger | None = None,
                 passthrough: tuple[type[BaseException], ...] = (), max_wasted: int | None = None):
        """``passthrough``: exception types raised by ``fn`` during warm-up/capture that are the caller's (the
        host's interrupt), re-raised instead of marking the key failed. ``max_wasted``: after this many graphs in a
        row were evicted without ever being reused, with no cache hit in between (default ``2 * max_graphs``),
        capturing stops for this cache; a hit resets the count, so one-off shapes in a long session never add up."""
        if max_graphs < 1:
            raise ValueError(f"GraphCache: max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = int(max_graphs)
        self.warmup_runs = int(warmup_runs)
        self.capturer = capturer if capturer is not None else CudaGraphCapturer()
        self.log = logger if logger is not None else log
        self.passthrough = tuple(passthrough)
        self.max_wasted = 2 * self.max_graphs if max_wasted is None else int(max_wasted)
        self.disabled: str | None = None  # why capturing stopped for this cache
        self._wasted_run = 0  # unused evictions since the last cache hit
        self._graphs: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._failed: OrderedDict[Hashable, str] = OrderedDict()  # keys that never capture again (bounded)
        self._logged: OrderedDict[Hashable, None] = OrderedDict()
        self.stats = {"captures": 0, "replays": 0, "eager": 0, "evictions": 0, "failures": 0, "wasted": 0}

    # ---- introspection
    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list:
        """Captured keys, least recently used first."""
        return list(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._failed.clear()
        self.disabled = None

    def discard_where(self, stale: Callable[[Hashable], bool]) -> int:
        """Drop the graphs whose key ``stale(key)`` says can never be hit again (freeing their pools); returns how
        many were dropped."""
        dead = [k for k in self._graphs if stale(k)]
        for k in dead:
            del self._graphs[k]
        return len(dead)

    # ---- helpers
    def _log_once(self, key, level: int, msg: str) -> None:
        if key in self._logged:
            return
        self._logged[key] = None
        if len(self._logged) > 256:
            self._logged.popitem(last=False)
        self.log.log(level, "fewstep graph: %s; running eagerly (key %s)", msg, _short(key))

    def _eager(self, fn, args, kwargs):
        self.stats["eager"] += 1
        return fn(*args, **kwargs)

    def _mark_failed(self, key, reason: str) -> None:
        self._failed[key] = reason
        if len(self._failed) > 256:
            self._failed.popitem(last=False)

    # ---- main entry
    def get_or_capture(self, key: Hashable, fn: Callable, static_inputs: Sequence = (), static_kwargs: dict | None = None):
        args = tuple(static_inputs)
        kwargs = {} if static_kwargs is None else dict(static_kwargs)
        leaves, spec = _flatten((args, kwargs))

        if key in self._failed:
            return self._eager(fn, args, kwargs)

        entry = self._graphs.get(key)
        if entry is None and self.disabled is not None:
            return self._eager(fn, args, kwargs)
        if entry is None:
            reason = self.capturer.unsupported_reason(leaves)
            if reason is not None:
                self._log_once(key, logging.INFO, reason)
                return self._eager(fn, args, kwargs)
            entry = self._capture(key, fn, spec, leaves)
            if entry is None:
                return self._eager(fn, args, kwargs)
        else:
            self._graphs.move_to_end(key)
            entry.hits += 1
            self._wasted_run = 0

        mismatch = self._mismatch(entry, spec, leaves)
        if mismatch is not None:
            self._log_once((key, "mismatch"), logging.WARNING, f"inputs do not match the graph captured for this key ({mismatch}); fix the key")
            return self._eager(fn, args, kwargs)

        for static, new in zip(entry.static_leaves, leaves):
            if static.data_ptr() != new.data_ptr() or static.stride() != new.stride():
                static.copy_(new)
        entry.replay()
        self.stats["replays"] += 1
        out_leaves, out_spec = _flatten(entry.static_out)
        return _unflatten(out_spec, [t.clone() for t in out_leaves])

    def _evict_one(self) -> None:
        _, old = self._graphs.popitem(last=False)
        self.stats["evictions"] += 1
        if old.hits == 0:
            self.stats["wasted"] += 1
            self._wasted_run += 1
            if self._wasted_run >= self.max_wasted and self.disabled is None:
                self.disabled = (f"{self._wasted_run} graphs in a row were evicted before any reuse (more input "
                                 f"shapes per step than the {self.max_graphs} kept); capture stopped for this model")
                self.log.warning("fewstep graph: %s; running eagerly", self.disabled)
                self._graphs.clear()

    def _capture(self, key, fn, spec, leaves) -> _Entry | None:
        while len(self._graphs) >= self.max_graphs and self.disabled is None:  # free a pool before making one
            self._evict_one()
        if self.disabled is not None:
            return None
        try:
            static_leaves = [t.detach().clone() for t in leaves]
            args, kwargs = _unflatten(spec, static_leaves)
            replay, static_out, handle = self.capturer.capture(fn, args, kwargs, self.warmup_runs)
        except self.passthrough:
            raise
        except Exception as e:
            self.stats["failures"] += 1
            self._mark_failed(key, f"{type(e).__name__}: {e}")
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._log_once(key, logging.WARNING, f"capture failed ({type(e).__name__}: {first_line})")
            return None
        entry = _Entry(spec, static_leaves, replay, static_out, handle)
        self._graphs[key] = entry
        self.stats["captures"] += 1
        return entry

    @staticmethod
    def _mismatch(entry: _Entry, spec, leaves) -> str | None:
        if not _same_structure(entry.spec, spec):
            return "argument structure or a non-tensor argument changed"
        if len(entry.static_leaves) != len(leaves):
            return "number of tensor inputs changed"
        for i, (s, t) in enumerate(zip(entry.static_leaves, leaves)):
            if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
                return f"tensor input {i}: {tuple(t.shape)} {t.dtype} {t.device} vs captured {tuple(s.shape)} {s.dtype} {s.device}"
        return None
