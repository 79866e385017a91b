"""Soak: the LoRA reader and the fuse under >= 1,000 hypothesis-generated hostile files (harness: tools.lorafuzz).

    python -m bench.bench_lora_fuzz [--cases 1000] [--seed N] [--json out.json]

Each case is a seed adapter of one kind (LoRA/LoCon, PEFT+DoRA, diffusers, kohya DoRA, LoHa, LoKr, GLoRA, OFT, BOFT,
IA3, full diff, norm) with mutations at four levels -- tensors (names, suffixes, shapes, dtypes, NaN/Inf, alphas),
header metadata (alphas, JSON, regex patterns), the safetensors header (dtypes, shapes, data_offsets, duplicate and
non-UTF-8 keys, metadata) and raw bytes (truncation, flips, header length) -- fused as the acceleration or a style
LoRA (linear/TIES/DARE) into a small SD1.5-layout host model, patched and unpatched in one process.

Figures: cases, outcomes (ok / clear error naming the file / unclear / crash / left patched / non-finite), the
stage each case ended at, cases per second. Exit status 1 when any case is a failure.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    from tools import hostenv, packroot
    packroot.import_pack()
    hostenv.import_host()
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from tools import lorafuzz
    logging.getLogger("fewstep").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    run_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    outcomes: collections.Counter = collections.Counter()
    stages: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fewstep-fuzz-") as tmp:
        harness = lorafuzz.Harness(Path(tmp) / "loras")
        t0 = time.perf_counter()

        @seed(run_seed)
        @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=lorafuzz.case_strategy())
        def soak(case):
            r = harness.run(case)
            outcomes[r.outcome] += 1
            stages[(r.outcome, r.stage)] += 1
            kinds[case.seed_name] += 1
            if r.outcome in lorafuzz.FAILURES:
                failures.append(f"{r.outcome} at {r.stage}: {r.detail}\n    {case}")
            if harness.count % 100 == 0:
                print(f"  {harness.count} cases, {dict(outcomes)}", flush=True)

        soak()
        seconds = time.perf_counter() - t0
        harness.close()
    total = sum(outcomes.values())
    fig = {"cases": total, "seed": run_seed, "seconds": round(seconds, 1),
           "outcomes": {o: outcomes.get(o, 0) for o in lorafuzz.OUTCOMES},
           "stages": {f"{o}/{s}": n for (o, s), n in sorted(stages.items())}, "seed_kinds": dict(sorted(kinds.items())),
           "failures": failures[:50]}
    print(f"# LoRA reader + fuse fuzz soak: {total} cases in {seconds:.0f} s ({total / seconds:.2f} cases/s), "
          f"hypothesis seed {run_seed}")
    print("| outcome | cases |\n|---|---|")
    for o in lorafuzz.OUTCOMES:
        print(f"| {o} | {outcomes.get(o, 0)} |")
    print("stages:", fig["stages"])
    print("seed kinds:", fig["seed_kinds"])
    for f in failures[:20]:
        print("FAILURE", f)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
