"""In-process host: the LoRA reader and the fuse under mutated files (hypothesis; harness in ``tools.lorafuzz``).

Every case is run as FewStep LoRA Fuse runs a file -- read, parse, key mapping, shape checks, plan -- then the host
patches a small SD1.5-layout model and unpatches it. A case must end fused (finite weights) or in a ValueError/OSError
naming the file; the model must be bit-exact afterwards. A fast deterministic sample runs here; the soak of 1,000+
cases is ``python -m bench.bench_lora_fuzz``.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis (requirements-dev.txt) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tools import lorafuzz  # noqa: E402  (strategies only; the host is imported by the harness fixture)

FAST_SAMPLE = 50


@pytest.fixture(scope="module")
def harness(host, tmp_path_factory):
    h = lorafuzz.Harness(tmp_path_factory.mktemp("fuzz") / "loras")
    logging.getLogger("fewstep").setLevel(logging.ERROR)  # the cases' warnings (unknown keys, ...) are expected
    yield h
    logging.getLogger("fewstep").setLevel(logging.NOTSET)
    h.close()


def test_every_seed_adapter_fuses_changes_weights_and_unpatches(harness):
    """The seeds are valid files of every kind and key style: each fuses, changes weights, and unpatches exactly
    (so the fuzz starts from files that reach the deepest stage)."""
    assert sorted(harness.seeds) == list(lorafuzz.SEED_NAMES)
    for name in lorafuzz.SEED_NAMES:
        for role in ("accel", "style"):
            r = harness.run(lorafuzz.Case(name, role=role))
            assert r.outcome == "ok" and r.patched >= 1 and r.changed >= 1, (name, role, r)


@settings(max_examples=FAST_SAMPLE, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=lorafuzz.case_strategy())
def test_fuzzed_files_fail_clearly_and_leave_the_model_unpatched(harness, case):
    r = harness.run(case)
    assert r.outcome not in lorafuzz.FAILURES, f"{r.outcome} at {r.stage}: {r.detail}\n{case}"


def _regression(harness, name, **kw):
    return harness.run(lorafuzz.Case(name, **kw))


def test_found_by_fuzzing_broken_alpha_pattern_regex_is_ignored(harness):
    """An ``alpha_pattern`` key that is no regular expression raised re.error out of the reader."""
    sd, _ = harness.seeds["peft_dora"]
    harness.seeds["bad_regex"] = (sd, {"lora_adapter_metadata": json.dumps({"lora_alpha": 8,
                                                                             "alpha_pattern": {"(": 2}})})
    try:
        assert _regression(harness, "bad_regex").outcome == "ok"
    finally:
        del harness.seeds["bad_regex"]


@pytest.mark.parametrize("name,key_end,shape,needle", [
    ("glora", "a1.weight", (), "GLoRA factors are matrices"),
    ("kohya_dora", "dora_scale", (), "() but model weight"),
])
def test_found_by_fuzzing_scalar_factors_are_clear_errors(harness, name, key_end, shape, needle):
    """A scalar GLoRA factor / kohya DoRA magnitude raised IndexError (the DoRA one only when the host patched)."""
    sd, meta = harness.seeds[name]
    key = next(k for k in sd if k.endswith(key_end))
    harness.seeds["scalar"] = ({**sd, key: torch.zeros(shape, dtype=torch.float16)}, meta)
    try:
        r = _regression(harness, "scalar")
    finally:
        del harness.seeds["scalar"]
    assert r.outcome == "clear" and needle in r.detail and r.stage in ("read", "fuse"), r


def test_found_by_fuzzing_absurd_alpha_is_refused_not_fused_into_inf(harness):
    """A finite but absurd alpha fused into fp16 weights of inf (a black image) without any error."""
    sd, meta = harness.seeds["loha"]
    alpha = next(k for k in sd if k.endswith(".alpha"))
    harness.seeds["huge_alpha"] = ({**sd, alpha: torch.tensor(1e30)}, meta)
    try:
        r = _regression(harness, "huge_alpha")
    finally:
        del harness.seeds["huge_alpha"]
    assert r.outcome == "clear" and r.stage == "patch", r
    assert "FewStep LoRA Fuse: fusing fuzz-" in r.detail and "far too large" in r.detail, r.detail


def test_nan_payload_and_truncation_name_the_file(harness):
    sd, meta = harness.seeds["lokr"]
    key = next(k for k in sd if k.endswith("lokr_w2_a"))
    harness.seeds["nan"] = ({**sd, key: sd[key].clone().fill_(float("nan"))}, meta)
    try:
        r = _regression(harness, "nan")
    finally:
        del harness.seeds["nan"]
    assert r.outcome == "clear" and r.stage == "read" and "contains NaN or Inf" in r.detail, r
    r = _regression(harness, "kohya", byte_ops=[("truncate", 5)])
    assert r.outcome == "clear" and r.stage == "read" and "cannot read safetensors file" in r.detail, r


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_weights_beyond_fp16_range_are_refused_in_any_dtype(host, dtype):
    """An fp32/bf16 model would hold a 1e6 weight, but no real adapter makes one: the patch refuses it as it refuses
    inf, naming the files; ordinary values pass unchanged."""
    from fewstep.nodes.lora_host import FusedDelta, range_limit

    def compute(device=None, out=None):
        d = torch.full((2, 2), value)
        return d if out is None else out.add_(d)
    delta = FusedDelta("FewStep LoRA Fuse", compute, limit=range_limit(torch.zeros(1, dtype=dtype)),
                       files=("a.safetensors", "b.safetensors"))
    for value, ok in ((3.0, True), (6e4, True), (1e6, False), (float("inf"), False), (float("nan"), False)):
        w = torch.zeros(2, 2)
        if ok:
            assert torch.equal(delta.calculate_weight(w, "k.weight", 1.0, 1.0, None, lambda a: a), torch.full((2, 2), value))
            continue
        with pytest.raises(ValueError, match=r"^FewStep LoRA Fuse: fusing a.safetensors, b.safetensors makes weight "
                                             r"'k.weight' (non-finite|as large as 1e\+06)"):
            delta.calculate_weight(w, "k.weight", 1.0, 1.0, None, lambda a: a)
