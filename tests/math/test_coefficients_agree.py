"""The kernel's coefficient builder (kernels/coefficients.py, used by the kernel tests and bench) and the sampler's
(samplers/consistency.py, used in production) give the same [n, 5] table, so the two cannot drift apart."""
import pytest
import torch

from kernels import linear_coefficients
from samplers import consistency, schedules
from samplers.discrete import DiscreteSchedule


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
