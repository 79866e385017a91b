"""The sampling run behind every fewstep sampler: options, step noise, and the unfused or the fused loop.

``samplers/lcm.py``, ``tcd.py`` and ``pcm.py`` are the named samplers; each is ``run`` with the switches that make
it that sampler. ``sample_consistency`` is the general one with every switch open. All are k-diffusion samplers,
``(model, x, sigmas, extra_args, callback, disable, noise_sampler, **options)``, and are what the KSampler dropdown
names and the SAMPLER nodes call. Settings resolve in this order: the sampler's own switches, the options given
to the call (a SAMPLER node's widgets), the FewStep Settings model patch (``model_options["transformer_options"]
["fewstep"]``, read at sample time), ``DEFAULTS``.

A run: the one coefficient table (``samplers.step.step_coefficients``) on the model's parametrisation; every step's
noise drawn before the loop (``samplers.noise.step_noise``: ``noise_sampler`` when given, else per (seed, batch
index)); then either the loop below (Python-float coefficients, the preview x0 only when a callback is attached,
nothing read back per step) or the fused loop of ``kernels.loop`` (one Triton launch per step, CUDA). Both read
the same table and the same noise rows, so a seed gives the same image either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import trange

from .noise import default_noise_sampler, step_noise
from .parametrisation import FINAL_STEPS, parametrisation, resolve_model_sampling
from .step import Step, StepCoefficients, step_coefficients

__all__ = ["SETTINGS_KEY", "NOISE_DEVICES", "FUSED_MODES", "DEFAULTS", "settings", "resolve_options", "run",
           "sample_consistency"]

log = logging.getLogger("fewstep")

#: Key of FewStep Settings' options in ``model_options["transformer_options"]``.
SETTINGS_KEY = "fewstep"
NOISE_DEVICES = ("cpu", "gpu")
FUSED_MODES = ("auto", "on", "off")
DEFAULTS = dict(gamma=0.3, boundary=False, clean_intermediate=False, final_step="x0", noise_device="cpu",
                batch_offset=0, fused="auto")


def settings(extra_args: dict | None) -> dict:
    """FewStep Settings' options carried by the model (``{}`` without that node)."""
    opts = (extra_args or {}).get("model_options", {}).get("transformer_options", {})
    return dict(opts.get(SETTINGS_KEY, {}))


def resolve_options(name: str, options: dict, extra_args: dict | None = None, fixed: dict | None = None) -> dict:
    """``DEFAULTS`` <- the model's FewStep Settings <- ``options`` (None = not given) <- ``fixed``, checked; errors
    name the sampler (``fewstep {name} sampler: ...``). Keys outside ``DEFAULTS`` are ignored."""
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in settings(extra_args).items() if k in DEFAULTS})
    opts.update({k: v for k, v in options.items() if k in DEFAULTS and v is not None})
    opts.update(fixed or {})
    gamma = opts["gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"fewstep {name} sampler: gamma must be in [0, 1], got {gamma!r}")
    for key, allowed in (("final_step", FINAL_STEPS), ("noise_device", NOISE_DEVICES), ("fused", FUSED_MODES)):
        if opts[key] not in allowed:
            raise ValueError(f"fewstep {name} sampler: {key} must be one of {allowed}, got {opts[key]!r}")
    if isinstance(opts["batch_offset"], bool) or not isinstance(opts["batch_offset"], int) or opts["batch_offset"] < 0:
        raise ValueError(f"fewstep {name} sampler: batch_offset must be an int >= 0, got {opts['batch_offset']!r}")
    return opts


def _kernel_loop():
    """``kernels.loop``, imported only when a run may take the fused path."""
    from ..kernels import loop
    return loop


@torch.no_grad()
def run(name: str, fixed: dict, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
        callback: Callable[[dict], None] | None = None, disable: bool | None = None,
        noise_sampler: Callable | None = None, *, model_sampling=None,
        capture: Callable | None = None, **options) -> torch.Tensor:
    """One sampling run of the named sampler ``name`` whose switches ``fixed`` overrides (see module docstring).

    Args:
        model: k-diffusion denoiser ``model(x, sigma * s_in, **extra_args) -> x0`` (VE space).
        x: initial latent, already scaled to ``sigmas[0]``.
        sigmas: SIGMAS, 1-D, strictly decreasing, at least 2 entries (only the last may be 0).
        extra_args: passed to the model; ``seed`` seeds the default step noise, ``model_options`` may carry
            FewStep Settings.
        callback: called every step with ``{'x','i','sigma','sigma_hat','denoised'}``, ``denoised`` being x0.
        noise_sampler: ``(sigma, sigma_next) -> z`` for the stochastic steps; default per (seed, batch index)
            noise (``batch_offset``, ``noise_device``).
        model_sampling: duck-typed model sampling; default ``model.inner_model.inner_model.model_sampling``.
        capture: host hook ``(model, x, extra_args) -> extra_args`` applied before the fused loop (the node layer
            passes CUDA-graph capture of the model call).
        options: ``gamma``, ``boundary``, ``clean_intermediate``, ``final_step``, ``noise_device``, ``batch_offset``,
            ``fused`` (``"auto"``: the fused loop on CUDA with Triton; ``"on"``: required; ``"off"``).
    """
    extra_args = {} if extra_args is None else extra_args
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"fewstep {name} sampler: the sigmas input has {sigmas.numel()} value(s); at least 2 (one "
                         "step) are needed. Check the SIGMAS wired into the sampler (e.g. a SplitSigmas at the end).")
    opts = resolve_options(name, options, extra_args, fixed)
    param = parametrisation(resolve_model_sampling(model, model_sampling))
    step = Step(float(opts["gamma"]), bool(opts["boundary"]), bool(opts["clean_intermediate"]))
    coeffs = step_coefficients(sigmas, param, step, opts["final_step"])
    a_z = coeffs.a_z.tolist()
    log.debug("fewstep %s: t=%s s=%s sigma_s=%s noise=%s", name, coeffs.t.tolist(), coeffs.s.tolist(),
              coeffs.sigma_s.tolist(), a_z)
    noise = None
    if any(c > 0 for c in a_z):
        if noise_sampler is None:
            noise_sampler = default_noise_sampler(x, extra_args.get("seed"), opts["batch_offset"],
                                                  cpu=opts["noise_device"] == "cpu")
        noise = step_noise(noise_sampler, x, sigmas, a_z)
    kernel_loop = _kernel_loop() if opts["fused"] != "off" else None
    if kernel_loop is not None and kernel_loop.use_fused(opts["fused"], x):
        if capture is not None:
            extra_args = capture(model, x, extra_args)
        return kernel_loop.sample_fused(model, x, sigmas, coeffs, noise, extra_args, callback, disable)
    return unfused_loop(model, x, sigmas, coeffs, noise, extra_args, callback, disable)


def unfused_loop(model, x: torch.Tensor, sigmas: torch.Tensor, coeffs: StepCoefficients, noise: torch.Tensor | None,
                 extra_args: dict, callback=None, disable=None) -> torch.Tensor:
    """The plain PyTorch loop: per step one model call and ``x = a_x*x + a_d*D_raw (+ a_z*z)`` with Python-float
    coefficients (exact in the latent's dtype, float64 included); the preview x0 only when a callback is attached;
    no per-step read of a device tensor (every branch is on the Python coefficients)."""
    a_x, a_d, a_z, b_x, b_d = (getattr(coeffs, f).tolist() for f in ("a_x", "a_d", "a_z", "b_x", "b_d"))
    boundary = any(v != 0.0 for v in b_x) or any(v != 1.0 for v in b_d)
    sigma_in = sigmas.to(x)[:, None] * x.new_ones([x.shape[0]])  # row i: sigmas[i] per image, for the whole run
    for i in trange(len(a_x), disable=disable):
        d_raw = model(x, sigma_in[i], **extra_args)
        if callback is not None:
            denoised = b_x[i] * x + b_d[i] * d_raw if boundary else d_raw
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x_next = a_x[i] * x + a_d[i] * d_raw
        if a_z[i] > 0:
            x_next = x_next + a_z[i] * noise[i]
        x = x_next
    return x


def sample_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
    """k-diffusion sampler with every switch of the one step open: ``gamma`` (0 = DDIM/Euler, between = TCD),
    ``boundary`` (LCM boundary condition), ``clean_intermediate`` (sigma_s = 0, diffusers' LCM); other options and
    arguments as in ``run``."""
    return run("consistency", {}, model, x, sigmas, extra_args, callback, disable, noise_sampler, **options)
