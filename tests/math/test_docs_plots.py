"""tools/docs_plots.py: the README's plots show the pack's own schedules and samplers, the exact Gaussian moments
agree with the samplers' draws, and the committed PNGs are small and current in name."""
from __future__ import annotations

import math

import pytest

from tools import docs_plots as D

REPO = D.REPO


def test_schedule_table_is_the_packs_grids():
    t = D.schedule_table()
    assert t["LCM grid (LCM; TCD's default)"][4] == [999, 759, 499, 259]
    assert t["TCD full grid"][4] == [999, 749, 499, 249]
    assert t["PCM phase edges (50)"][4] == [999, 739, 499, 239]
    assert t["trailing (Hyper-SD, Lightning)"][4] == [999, 749, 499, 249]
    assert t["core sgm_uniform"][4] == pytest.approx([999, 749.25, 499.5, 249.75])
    assert all(sorted(grid) == list(D.STEPS) and all(len(ts) == n for n, ts in grid.items()) for grid in t.values())


def test_exact_moments_match_the_samplers_draws():
    """Lines and dots of the Gaussian plot agree within 5 standard errors (so neither is drawn wrong)."""
    n = 100_000
    table = D.gaussian_table(draws=n, seed=1)
    assert set(table) == {"LCM", *(f"TCD γ={g:g}" for g in D.TCD_GAMMAS), "DDIM = Euler (γ=0)"}
    for label, row in table.items():
        for k in range(len(D.STEPS)):
            v = row["exact_var_ratio"][k] * D.S ** 2
            se_mean, se_ratio = math.sqrt(v / n), row["exact_var_ratio"][k] * math.sqrt(2 / n)
            assert abs(row["drawn_mean_err"][k] - row["exact_mean_err"][k]) < 5 * se_mean, (label, k)
            assert abs(row["drawn_var_ratio"][k] - row["exact_var_ratio"][k]) < 5 * se_ratio, (label, k)
    # What the plot shows: more steps bring the output variance closer to the data's, for every sampler.
    assert all(row["exact_var_ratio"][-1] > row["exact_var_ratio"][1] > row["exact_var_ratio"][0] for row in
               table.values())


def test_plots_are_written_small(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is a development dependency (make setup installs it)")
    import matplotlib
    matplotlib.use("Agg")
    D.plot_schedules(tmp_path / "schedules.png")
    D.plot_gaussian(tmp_path / "gaussian_error.png", D.gaussian_table(draws=2_000))
    for name in ("schedules.png", "gaussian_error.png"):
        for path in (tmp_path / name, REPO / "docs" / name):
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150 * 1024, (path, len(data))
    readme = (REPO / "README.md").read_text()
    assert "docs/schedules.png" in readme and "docs/gaussian_error.png" in readme
