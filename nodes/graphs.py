"""CUDA-graph capture of the UNet call for the fused sampling path, through the host's wrapper API.

`with_graph_capture` returns extra_args whose model_options (a copy) carry a DIFFUSION_MODEL wrapper keyed
``fewstep_cuda_graph``. Nothing global is replaced. One graph is kept per (latent shape, dtype, cond shapes, cfg
on/off, patch state). Patch state is the identity of every UNet parameter (the host replaces a Parameter when it
patches a LoRA, so a new LoRA gives a new graph, while in-place updates are read by the replay anyway), plus what a
graph bakes in that addresses do not show: the clone's object patches on the UNet, its weight wrappers and weight
patch set, and an attention override in transformer_options. At each sampling start graphs that can no longer replay
are released: this UNet's graphs over moved weights, and all graphs of UNets whose weights left the device. The
host's interrupt (Cancel) propagates out of a capture. These cases run eagerly instead, with one log line each: a CPU
latent, lowvram or a partly loaded model, an unknown allocator, a ControlNet or attention patches (their Python runs
per step), a cache that keeps evicting graphs unused, and any capture failure.
"""
from __future__ import annotations

import functools
import logging
import os
import weakref

import comfy.model_patcher
import comfy.patcher_extension as pe

from ..kernels.graph import GraphCache, GraphKey, allocator_backend, capture_allowed

log = logging.getLogger("fewstep")

WRAPPER_KEY = "fewstep_cuda_graph"
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet module -> GraphCache
_LOGGED: set = set()


def log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info("fewstep: %s", msg)


def cache_for(unet, capturer=None) -> GraphCache:
    import comfy.model_management
    cache = _CACHES.get(unet)
    if cache is None:
        cache = _CACHES[unet] = GraphCache(max_graphs=4, capturer=capturer, logger=log,
                                           passthrough=(comfy.model_management.InterruptProcessingException,))
    return cache


def patch_state(unet) -> tuple:
    return (id(unet), tuple(p.data_ptr() for p in unet.parameters()))


def _weight_ptrs(key):
    """The weight addresses a key was captured over (``diffusion_model_wrapper``'s patch state), else None."""
    try:
        return key.patch_state[0][1]
    except (AttributeError, IndexError, TypeError):
        return None


def release_stale_graphs(unet, device) -> None:
    """Free graphs that can never replay: this UNet's graphs captured over other weight addresses (a LoRA swap or an
    offload/reload moved them), and every graph of a UNet whose weights have left ``device`` (offloaded: its pools
    would otherwise stay in VRAM, outside ComfyUI's accounting)."""
    current = patch_state(unet)[1]
    for other, cache in list(_CACHES.items()):
        if other is unet:
            dropped = cache.discard_where(lambda k: _weight_ptrs(k) not in (None, current))
        else:
            first = next(other.parameters(), None)
            dropped = len(cache) if first is not None and first.device != device else 0
            if dropped:
                cache.clear()
        if dropped:
            log.info("fewstep graph: released %d CUDA graph(s) that can no longer replay", dropped)


def patcher_fingerprint(patcher) -> tuple:
    """What a graph bakes in that parameter addresses do not show, per model clone: object patches on the UNet
    (swapped modules or forwards), weight-wrapper functions, and the weight-patch set."""
    objects = tuple(sorted((k, id(v)) for k, v in getattr(patcher, "object_patches", {}).items()
                           if k.startswith("diffusion_model")))
    wrappers = tuple(sorted(getattr(patcher, "weight_wrapper_patches", {}) or {}))
    return (getattr(patcher, "patches_uuid", None), objects, wrappers)


def eager_reason(control, transformer_options: dict, kwargs: dict) -> str | None:
    if control is not None:
        return "a ControlNet is attached"
    if transformer_options.get("patches") or transformer_options.get("patches_replace"):
        return "attention patches are active (their Python runs every step)"
    if kwargs:
        return f"extra model inputs {sorted(kwargs)}"
    return None


def diffusion_model_wrapper(executor, x, timesteps=None, context=None, y=None, control=None,
                            transformer_options={}, fingerprint=(), **kwargs):  # noqa: B006 (the host's signature)
    reason = eager_reason(control, transformer_options, kwargs)
    if reason is not None:
        log_once(f"CUDA graph capture skipped: {reason}; running the UNet eagerly")
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    unet = executor.class_obj
    cfg = len(transformer_options.get("cond_or_uncond", ())) > 1
    # An attention override (e.g. SageAttention nodes) is Python the graph would bake in: part of the key.
    override = transformer_options.get("optimized_attention_override")
    state = (patch_state(unet), fingerprint, None if override is None else id(override))
    key = GraphKey.from_tensors(x, (timesteps, context, y), cfg=cfg, patch_state=state)

    def call(x, timesteps, context, y):
        return executor(x, timesteps, context, y, None, transformer_options)

    return cache_for(unet).get_or_capture(key, call, (x, timesteps, context, y))


def fully_loaded(patcher, device) -> bool:
    """Every UNet weight resident on ``device`` with no lowvram streaming (loaded_size vs model_size would also
    count buffers that a non-full load leaves out)."""
    if getattr(patcher.model, "model_lowvram", False) or getattr(patcher, "lowvram_patch_counter", lambda: 0)() > 0:
        return False
    return all(p.device == device for p in patcher.model.diffusion_model.parameters())


def model_patcher_of(model):
    """The ModelPatcher behind the k-diffusion model wrapper (KSamplerX0Inpaint -> guider -> model_patcher)."""
    return getattr(getattr(model, "inner_model", None), "model_patcher", None)


def with_graph_capture(model, x, extra_args: dict) -> dict:
    """extra_args with the capture wrapper added to a copy of model_options, or unchanged (one log line why)."""
    if os.environ.get("FEWSTEP_CUDA_GRAPHS", "1") == "0":
        log_once("CUDA graph capture off (FEWSTEP_CUDA_GRAPHS=0)")
        return extra_args
    patcher = model_patcher_of(model)
    if patcher is None:
        log_once("CUDA graph capture off: no model patcher found behind the sampler's model")
        return extra_args
    ok, reason = capture_allowed(device_type=x.device.type, model_fully_loaded=fully_loaded(patcher, x.device),
                                 lowvram=bool(getattr(patcher.model, "model_lowvram", False)),
                                 allocator=allocator_backend())
    if not ok:
        log_once(f"CUDA graph capture off: {reason}")
        return extra_args
    options = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
    release_stale_graphs(patcher.model.diffusion_model, x.device)
    wrapper = functools.partial(diffusion_model_wrapper, fingerprint=patcher_fingerprint(patcher))
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper, options, is_model_options=True)
    return {**extra_args, "model_options": options}
