"""Per-(seed, batch index) noise: batch-size independence, pre_draw equality, CPU determinism."""
from __future__ import annotations

import pytest
import torch

from fewstep.samplers.noise import BatchStepNoise, batch_seed, default_noise_sampler, initial_noise


def test_batch_seed_stable_and_in_range():
    # Pinned: changing these changes every user's images.
    assert batch_seed(0, 0, 0) == 1279368494785126216
    assert batch_seed(123456789, 3, 1) == 1726919432817734202
    seen = {batch_seed(s, i, st) for s in (0, 1, 2**64 - 1, -1) for i in range(4) for st in (0, 1)}
    assert len(seen) == 3 * 4 * 2  # -1 == 2**64 - 1 modulo 2**64
    assert all(0 <= v < 2**63 for v in seen)
    for bad in ((0, -1, 0), (0, 0, -1), (0.5, 0, 0), (0, True, 0)):
        with pytest.raises(ValueError):
            batch_seed(*bad)


@pytest.mark.parametrize("shape", [(4, 4, 8, 8), (4, 4, 3, 8, 8)])
def test_initial_noise_batch_size_independent(shape):
    full = initial_noise(shape, seed=42)
    for b in range(1, 5):
        for off in range(0, 5 - b):
            part = initial_noise((b, *shape[1:]), seed=42, batch_indices=range(off, off + b))
            assert torch.equal(part, full[off : off + b])
    assert not torch.equal(full[0], full[1])
    assert torch.equal(initial_noise(shape, 42, dtype=torch.float64), full.double())
    assert not torch.equal(initial_noise(shape, 43), full)


def test_initial_noise_errors():
    with pytest.raises(ValueError, match="batch_indices"):
        initial_noise((2, 4, 8, 8), 0, batch_indices=[0])
    with pytest.raises(ValueError, match="shape"):
        initial_noise((4,), 0)


@pytest.mark.parametrize("shape", [(4, 4, 8, 8), (4, 4, 3, 8, 8), (16, 4, 8, 8)])
def test_step_noise_batch_size_independent(shape):
    x = torch.zeros(shape)
    full = BatchStepNoise(x, seed=7)
    full_steps = [full(None, None) for _ in range(3)]
    for k in range(shape[0]):
        alone = BatchStepNoise(x[k : k + 1], seed=7, batch_offset=k)
        for step in full_steps:
            assert torch.equal(alone(None, None)[0], step[k])
    assert not torch.equal(full_steps[0], full_steps[1])
    # step noise and initial noise are different streams
    assert not torch.equal(full_steps[0], initial_noise(shape, 7))


def test_pre_draw_equals_step_by_step_and_dtype():
    x = torch.zeros(3, 4, 6, 6, dtype=torch.float64)
    seq = BatchStepNoise(x, seed=11, batch_offset=2)
    expected = torch.stack([seq(None, None) for _ in range(5)])
    got = BatchStepNoise(x, seed=11, batch_offset=2).pre_draw(5)
    assert got.dtype == torch.float64 and got.shape == (5, *x.shape)
    assert torch.equal(got, expected)
    assert BatchStepNoise(x, 11).pre_draw(0).shape == (0, *x.shape)
    assert torch.equal(BatchStepNoise(x.float(), 11)(None, None).double(), BatchStepNoise(x, 11)(None, None))


def test_cpu_determinism_and_device_generator():
    x = torch.zeros(2, 4, 8, 8)
    a, b = BatchStepNoise(x, 5), BatchStepNoise(x, 5)
    for _ in range(3):
        assert torch.equal(a(None, None), b(None, None))
    assert torch.equal(BatchStepNoise(x, 5, cpu=False)(None, None), BatchStepNoise(x, 5)(None, None))  # x is on CPU
    with pytest.raises(ValueError, match="batch_offset"):
        BatchStepNoise(x, 5, batch_offset=-1)


def test_default_noise_sampler():
    x = torch.zeros(2, 4, 8, 8)
    assert torch.equal(default_noise_sampler(x, 3)(None, None), BatchStepNoise(x, 3)(None, None))
    torch.manual_seed(0)
    first = default_noise_sampler(x, None)(None, None)
    torch.manual_seed(0)
    assert torch.equal(default_noise_sampler(x, None)(None, None), first)
