"""The README's schedule plot draws core's sgm_uniform with the host's own rule (tools/docs_plots.py restates it)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sgm_uniform_restatement_matches_the_host(host, steps):
    import comfy.model_sampling
    import comfy.samplers

    from tools import docs_plots

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    ms = Sampling()  # SD1.5/SDXL's scaled-linear betas, as docs_plots.SCHED
    host = comfy.samplers.calculate_sigmas(ms, "sgm_uniform", steps).double()
    ours = docs_plots.SCHED.sigma(torch.tensor(docs_plots.sgm_uniform_timesteps(steps), dtype=torch.float64))
    assert torch.allclose(host[:-1], ours, rtol=1e-5), (host, ours)
    assert float(host[-1]) == 0.0
