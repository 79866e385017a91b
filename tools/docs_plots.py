"""The README's plots, made from the pack's own schedule and sampler functions.

    python -m tools.docs_plots [OUTDIR]      # `make docs` writes docs/; `make demo` also writes them to out/

1. ``schedules.png``: the training timesteps each schedule picks for 1-8 steps -- the LCM skipping grid (LCM and
   TCD by default), TCD's full grid (diffusers with ``original_inference_steps`` passed), PCM phase edges (50-point
   DDIM solver), trailing (Hyper-SD, SDXL-Lightning) and ComfyUI core's ``sgm_uniform``.
2. ``gaussian_error.png``: how far each sampler's output distribution is from the data distribution, against the step
   count, on data whose answer is known in closed form: x0 ~ N(mu, s^2) per element with the exact denoiser
   E[x0 | x_sigma] = mu + s^2 / (s^2 + sigma^2) (x_sigma - mu). Every step is affine in x plus fresh Gaussian noise, so
   the output's mean and variance follow an exact recursion (lines). The markers are the pack's real samplers run on
   500,000 draws (float64) -- they sit on the lines. All samplers use the same LCM 50-point grid, so only the step rule
   differs.

The pack functions used are exactly: ``fewstep.samplers.schedules`` (``lcm_timesteps``, ``tcd_timesteps``,
``pcm_phase_timesteps``, ``trailing_timesteps``, ``timesteps_to_sigmas``), ``fewstep.samplers.discrete.DiscreteSchedule``
and the samplers ``fewstep.samplers.lcm.sample_lcm``, ``fewstep.samplers.tcd.sample_tcd`` and
``fewstep.samplers.pcm.sample_pcm``. matplotlib is a development dependency only (requirements-dev.txt).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from tools import packroot

packroot.import_pack()
from fewstep.samplers import schedules  # noqa: E402
from fewstep.samplers.discrete import DiscreteSchedule  # noqa: E402

REPO = packroot.REPO
STEPS = range(1, 9)
MU, S = 0.5, 0.8  # the Gaussian data of tests/math/test_gaussian_consistency.py
DRAWS = 500_000
TCD_GAMMAS = (0.1, 0.3, 0.5, 0.9)
SCHED = DiscreteSchedule(dtype=torch.float64)  # SD1.5/SDXL's scaled-linear betas


def sgm_uniform_timesteps(steps: int, model_sampling=SCHED) -> list[float]:
    """ComfyUI core's ``sgm_uniform`` (``comfy/samplers.py``, ``normal_scheduler(sgm=True)``): ``steps`` points evenly
    spaced in timestep from t(sigma_max) towards t(sigma_min), the end point left out."""
    start = float(model_sampling.timestep(model_sampling.sigma_max))
    end = float(model_sampling.timestep(model_sampling.sigma_min))
    return [float(t) for t in torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]]


def schedule_table() -> dict[str, dict[int, list[float]]]:
    """{schedule label: {steps: timesteps}} for the first plot."""
    return {
        "LCM grid (LCM; TCD's default)": {n: schedules.lcm_timesteps(n) for n in STEPS},
        "TCD full grid": {n: schedules.tcd_timesteps(n, full_grid=True) for n in STEPS},
        "PCM phase edges (50)": {n: schedules.pcm_phase_timesteps(n) for n in STEPS},
        "trailing (Hyper-SD, Lightning)": {n: schedules.trailing_timesteps(n) for n in STEPS},
        "core sgm_uniform": {n: sgm_uniform_timesteps(n) for n in STEPS},
    }


# ---------------------------------------------------------------------------------------------- Gaussian target

def lcm_boundary(t: float) -> tuple[float, float]:
    """LCM's boundary-condition scalings (c_skip, c_out) at timestep t: sigma_data 0.5, timestep scaling 10
    (diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``)."""
    scaled = 10.0 * t
    return 0.25 / (scaled * scaled + 0.25), scaled / math.sqrt(scaled * scaled + 0.25)


def exact_moments(sigmas: torch.Tensor, gamma: float, boundary: bool, clean: bool) -> tuple[float, float]:
    """Mean and variance of the sampler's output from x = sigma_max * N(0, 1), exactly.

    One consistency step (LCM, TCD, DDIM): x0 = D(x) (with LCM's boundary condition on the VP-scaled input), then a
    deterministic DDIM move to s = floor((1 - gamma) t_next) (to x0 itself for LCM) and fresh noise up to sigma_next.
    """
    m, v = 0.0, float(sigmas[0]) ** 2
    for i in range(len(sigmas) - 1):
        sig, sig_next = float(sigmas[i]), float(sigmas[i + 1])
        k = S * S / (S * S + sig * sig)
        alpha, beta = k, (1 - k) * MU  # x0 = alpha x + beta
        if boundary:
            c_skip, c_out = lcm_boundary(float(SCHED.timestep(sigmas[i])))
            alpha, beta = c_out * alpha + c_skip / math.sqrt(1 + sig * sig), c_out * beta
        if sig_next == 0:
            return alpha * m + beta, alpha * alpha * v
        t_next = float(SCHED.timestep(sigmas[i + 1]))
        s = math.floor((1 - gamma) * t_next)
        sig_s = 0.0 if clean else (sig_next if s == t_next else float(SCHED.sigma(torch.tensor(float(s)))))
        r = sig_s / sig
        a, b = r + (1 - r) * alpha, (1 - r) * beta
        m, v = a * m + b, a * a * v + (sig_next * sig_next - sig_s * sig_s)
    raise ValueError("sigmas must end in 0")


def exact_denoiser(x, sigma, **_):
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S * S / (S * S + s2) * (x - MU)


def samplers() -> dict[str, tuple]:
    """{label: (run(x, sigmas, seed), gamma, boundary, clean)} -- the pack's samplers and their step switches."""
    from fewstep.samplers.lcm import sample_lcm
    from fewstep.samplers.pcm import sample_pcm
    from fewstep.samplers.tcd import sample_tcd

    def call(fn, **kw):
        return lambda x, sig, seed: fn(exact_denoiser, x, sig, {"seed": seed}, disable=True, model_sampling=SCHED, **kw)

    out = {"LCM": (call(sample_lcm), 1.0, True, True)}
    for g in TCD_GAMMAS:
        out[f"TCD γ={g:g}"] = (call(sample_tcd, gamma=g), g, False, False)
    out["DDIM = Euler (γ=0)"] = (call(sample_pcm), 0.0, False, False)
    return out


def gaussian_table(draws: int = DRAWS, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """{sampler: {"exact_mean_err", "exact_var_ratio", "drawn_mean_err", "drawn_var_ratio"}} over STEPS."""
    table = {}
    gen = torch.Generator().manual_seed(seed)
    for label, (run, gamma, boundary, clean) in samplers().items():
        row: dict[str, list[float]] = {k: [] for k in ("exact_mean_err", "exact_var_ratio", "drawn_mean_err",
                                                        "drawn_var_ratio")}
        for n in STEPS:
            sigmas = schedules.timesteps_to_sigmas(schedules.lcm_timesteps(n), SCHED)
            m, v = exact_moments(sigmas, gamma, boundary, clean)
            x = torch.randn(draws, generator=gen, dtype=torch.float64) * sigmas[0]
            out = run(x.reshape(1, -1), sigmas, int(torch.randint(0, 2**31, (1,), generator=gen)))
            row["exact_mean_err"].append(m - MU)
            row["exact_var_ratio"].append(v / (S * S))
            row["drawn_mean_err"].append(out.mean().item() - MU)
            row["drawn_var_ratio"].append(out.var().item() / (S * S))
        table[label] = row
    return table


# ---------------------------------------------------------------------------------------------- drawing

def _style(plt) -> None:
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9.5, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "fewstep", "figure.dpi": 100})


def plot_schedules(path: Path) -> None:
    import matplotlib.pyplot as plt
    _style(plt)
    table = schedule_table()
    fig, axes = plt.subplots(1, len(table), figsize=(12.5, 3.1), sharey=True)
    for ax, (label, grid) in zip(axes, table.items()):
        for n, ts in grid.items():
            ax.plot([n] * len(ts), ts, "o", ms=3.6, color="#1f5fa6")
            ax.plot([n] * len(ts), ts, "-", lw=0.6, color="#1f5fa6", alpha=0.35)
        ax.set_title(label)
        ax.set_xticks(list(STEPS))
        ax.set_xlabel("steps")
        ax.set_ylim(-30, 1030)
        ax.grid(axis="y", lw=0.4, alpha=0.5)
    axes[0].set_ylabel("training timestep (999 = pure noise)")
    fig.suptitle("Timesteps each schedule picks for 1–8 steps (SD1.5 / SDXL, 1000 training timesteps)", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def plot_gaussian(path: Path, table: dict | None = None) -> None:
    import matplotlib.pyplot as plt
    _style(plt)
    table = table or gaussian_table()
    colors = {"LCM": "#c0392b", "DDIM = Euler (γ=0)": "#222222"}
    tcd_colors = ["#7fcdbb", "#41b6c4", "#225ea8", "#0c2c84"]
    fig, (ax_v, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = list(STEPS)
    for i, (label, row) in enumerate(table.items()):
        color = colors.get(label) or tcd_colors[(i - 1) % len(tcd_colors)]
        ax_v.plot(steps, row["exact_var_ratio"], "-", color=color, lw=1.6, label=label)
        ax_v.plot(steps, row["drawn_var_ratio"], "o", color=color, ms=3.5)
        ax_m.plot(steps, row["exact_mean_err"], "-", color=color, lw=1.6, label=label)
        ax_m.plot(steps, row["drawn_mean_err"], "o", color=color, ms=3.5)
    ax_v.axhline(1.0, color="#888888", lw=0.8, ls="--")
    ax_v.set_title("output variance / data variance (1 = exact)")
    ax_v.set_ylim(0, 1.25)
    ax_m.axhline(0.0, color="#888888", lw=0.8, ls="--")
    ax_m.set_title("output mean − data mean (0 = exact)")
    for ax in (ax_v, ax_m):
        ax.set_xticks(steps)
        ax.set_xlabel("steps (LCM 50-point grid)")
        ax.grid(lw=0.4, alpha=0.5)
    handles, labels = ax_v.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8.5, frameon=False)
    fig.suptitle(f"Data N({MU:g}, {S:g}²), exact denoiser — lines: exact output moments; dots: the pack's samplers, "
                 f"{DRAWS:,} draws", y=0.99)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else REPO / "docs"
    try:
        import matplotlib
    except ImportError:
        print("docs plots: matplotlib is not installed (a development dependency: run `make setup`)", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    plot_schedules(out / "schedules.png")
    plot_gaussian(out / "gaussian_error.png")
    for name in ("schedules.png", "gaussian_error.png"):
        p = out / name
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
