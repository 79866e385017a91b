"""The kernel's coefficient builder (kernels/coefficients.py, used by the kernel tests and bench) and the sampler's
(samplers/consistency.py, used in production) give the same [n, 5] table, so the two cannot drift apart."""
from __future__ import annotations
import pytest
import torch

from fewstep.kernels import linear_coefficients
from fewstep.samplers import consistency, schedules
from fewstep.samplers.discrete import DiscreteSchedule


@pytest.mark.parametrize("gamma,boundary,clean", [(1.0, True, True), (0.3, False, False), (0.0, False, False),
                                                   (0.7, True, False)])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_kernel_and_sampler_coefficients_agree(gamma, boundary, clean, steps):
    ms = DiscreteSchedule(dtype=torch.float64)
    sigmas = schedules.timesteps_to_sigmas(schedules.lcm_timesteps(steps), ms, dtype=torch.float64)
    sc = consistency.step_coefficients(sigmas, ms, gamma, boundary, clean, "x0")
    ours = consistency.linear_step_coefficients(sc).as_tensor()
    theirs = linear_coefficients(sigmas, sc.sigma_s, sc.c_skipv, sc.c_out)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("final_step", ["x0", "diffusers"])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("gamma,boundary", [(0.3, False), (1.0, True)])
def test_agree_on_diffusers_final_step_and_split_schedules(final_step, split, gamma, boundary):
    """The diffusers final step (VP scale on its last row) and split schedules (ending above sigma 0, so the last
    step re-noises) give the same table from both builders."""
    ms = DiscreteSchedule(dtype=torch.float64)
    sigmas = schedules.timesteps_to_sigmas(schedules.lcm_timesteps(4), ms, dtype=torch.float64)
    if split:
        sigmas = sigmas[:3]  # 999 -> 759 -> 499: the second half of a SplitSigmas pair samples the rest
    sc = consistency.step_coefficients(sigmas, ms, gamma, boundary, False, final_step)
    ours = consistency.linear_step_coefficients(sc).as_tensor()
    theirs = linear_coefficients(sigmas, sc.sigma_s, sc.c_skipv, sc.c_out, sc.scale)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
    if split:
        assert ours[-1, 2] > 0  # the last step of a split schedule re-noises
