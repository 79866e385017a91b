"""CUDA-graph capture of the UNet call for the fused sampling path, through the host's wrapper API.

`with_graph_capture` returns extra_args whose model_options (a copy) carry a DIFFUSION_MODEL wrapper keyed
``fewstep_cuda_graph``. Nothing global is replaced. One graph is kept per (latent shape, dtype, cond shapes, cfg
on/off, patch state). Patch state is the identity of every UNet parameter: the host replaces a Parameter when it
patches a LoRA, so a new LoRA gives a new graph, while in-place updates are read by the replay anyway. These cases run
eagerly instead, with one log line each: a CPU latent, lowvram or a partly loaded model, an unknown allocator, a
ControlNet or attention patches (their Python runs per step), and any capture failure.
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
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # UNet module -> GraphCache
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
    ok, reason = capture_allowed(device_type=x.device.type,
                                 model_fully_loaded=patcher.loaded_size() >= patcher.model_size(),
                                 lowvram=bool(getattr(patcher.model, "model_lowvram", False)),
                                 allocator=allocator_backend())
    if not ok:
        log_once(f"CUDA graph capture off: {reason}")
        return extra_args
    options = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
    wrapper = functools.partial(diffusion_model_wrapper, fingerprint=patcher_fingerprint(patcher))
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper, options, is_model_options=True)
    return {**extra_args, "model_options": options}
