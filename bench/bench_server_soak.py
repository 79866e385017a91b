"""Soak through a real server: >= 200 queued prompts mixing every workflows/api/*.json, interrupts, prompts that
must fail, and a server restart mid-queue.

    python -m bench.bench_server_soak [--prompts 200] [--size 64] [--rounds 5] [--compare 12] [--json out.json]

Rounds of prompts are queued on server A: every shipped API workflow at --size px, three in a row with their own
seeds, then the next workflow (so the fused and the plain model alternate); about 1 in 12 is a prompt that must fail
with a clear error (an impossible schedule, a FLOAT link out of range, an adapter whose absurd alpha the fuse refuses
when the host patches it). From the second round on, /interrupt is posted now and then. Mid-way through one round
server A is stopped with prompts still queued; server B starts on the same output folder and every prompt with no
history entry yet is queued again there (a server that dies unplanned is replaced the same way, and counted). At
the end a fresh server re-runs a sample of the completed prompts, the latest of each workflow, and its images are
compared with the soak's, pixel for pixel.

Figures: completed, failed with a clear error, interrupted, lost (a prompt neither completed nor failed with an error
once the restart's requeue drained; must be 0), server RSS after each round and its growth after the first round
(per server), images equal to a fresh server's, wall time.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FAIL_EVERY = 12  # about one prompt in this many must fail with a clear error
RUN = 3  # prompts of one workflow in a row (different seeds) before the next workflow: switches stay frequent
CLEAR_ERROR = ("FewStep", "fewstep")  # an execution error that names the pack's node
ABSURD = "soak-absurd-alpha.safetensors"  # a style LoRA whose alphas are 1e30 (the fuse refuses it when patching)


def prompt_seed_inputs(prompt: dict, seed: int) -> dict:
    """A copy of ``prompt`` with every seed widget (KSampler seed, SamplerCustom/FewStep Noise noise_seed) = seed."""
    p = copy.deepcopy(prompt)
    for n in p.values():
        for k in ("seed", "noise_seed"):
            if k in n["inputs"] and not isinstance(n["inputs"][k], list):
                n["inputs"][k] = seed
    return p


def failing_prompts(small) -> list[tuple[str, dict]]:
    """Prompts that pass /prompt and must fail while running, with an error naming a pack node."""
    from tests.e2e.workflows import load_api
    out = []
    p = small(load_api("fewstep_tcd_samplercustom.json"))
    p["11"] = {"class_type": "FewStepScheduleLCM", "inputs": {"model": ["1", 0], "steps": 20, "strength": 0.3,
                                                             "original_steps": "50"}}
    out.append(("impossible LCM schedule", p))
    p = small(load_api("fewstep_tcd_samplercustom.json"))
    p["20"] = {"class_type": "FewStepPreset", "inputs": {"model": ["1", 0], "preset": "LCM-LoRA", "steps": 0,
                                                         "strength": 1.0, "gamma": -1.0}}
    p["10"]["inputs"]["gamma"] = ["20", 2]  # cfg 1.5 linked into gamma (allowed [0, 1])
    out.append(("linked gamma out of range", p))
    p = small(load_api("fewstep_lora_fuse.json"))
    fid = next(k for k, n in p.items() if n["class_type"] == "FewStepLoraFuse")
    p[fid]["inputs"]["style_lora_2"] = ABSURD
    out.append(("absurd alpha refused at patch time", p))
    return out


def loras_folder(standin_dir: Path, tmp: Path) -> Path:
    """A model folder for the soak's servers: the stand-ins linked, plus an adapter with an absurd alpha (written
    here, never into the shared stand-in cache)."""
    import torch
    from safetensors.torch import load_file, save_file
    root = tmp / "models"
    for sub in standin_dir.iterdir():
        if sub.is_dir() and sub.name != "loras":
            (root / sub.name).mkdir(parents=True, exist_ok=True)
            for f in sub.iterdir():
                (root / sub.name / f.name).symlink_to(f)
    (root / "loras").mkdir(parents=True, exist_ok=True)
    for f in (standin_dir / "loras").iterdir():
        (root / "loras" / f.name).symlink_to(f)
    sd = load_file(str(standin_dir / "loras" / "style-sd15-kohya.safetensors"))
    sd = {k: (torch.tensor(1e30) if k.endswith(".alpha") else v) for k, v in sd.items()}
    save_file(sd, str(root / "loras" / ABSURD))
    return root


class ServerDied(RuntimeError):
    pass


class Soak:
    """The prompts, the servers they ran on, and what became of each."""

    def __init__(self, models: Path, out_dir: Path, server_args: tuple[str, ...] = ()):
        from tools import hostenv
        self.hostenv, self.models, self.out_dir, self.server_args = hostenv, models, out_dir, server_args
        self.server = None
        self.records: dict[str, dict] = {}  # our id -> prompt, kind, seed, round, ids [(server, prompt id)], entry
        self.rss: dict[str, list[float]] = {}
        self.interrupts = 0
        self.restarts: list[str] = []  # "A->B planned", "B->C server died (...)"

    def start(self, name: str):
        self.server = self.hostenv.Server(output_dir=self.out_dir, standin_dir=self.models,
                                          extra_args=self.server_args).start()
        self.server.name = name
        self.rss[name] = []
        return self.server

    def restart(self, reason: str) -> int:
        """Stop the server (if it still runs), start the next one, and queue again every prompt with no history
        entry yet; returns how many were queued again."""
        old = self.server.name
        self.server.stop()
        self.start(chr(ord(old) + 1))
        self.restarts.append(f"{old}->{self.server.name} {reason}")
        again = [rid for rid, r in self.records.items() if r["entry"] is None]
        for rid in again:
            self.records[rid]["requeued"] = self.records[rid].get("requeued", 0) + 1
            self.submit(rid)
        print(f"restart {self.restarts[-1]}: {len(again)} prompts queued again", flush=True)
        return len(again)

    def alive(self) -> None:
        if self.server.proc.poll() is not None:
            raise ServerDied(f"server {self.server.name} exited with {self.server.proc.returncode}: "
                             f"{self.server.log_tail(5)}")

    def rss_mb(self) -> float:
        import psutil
        return psutil.Process(self.server.proc.pid).memory_info().rss / 2 ** 20

    def submit(self, rid: str) -> None:
        rec = self.records[rid]
        try:
            status, body = self.server.post("/prompt", {"prompt": rec["prompt"], "client_id": "fewstep-soak"},
                                            timeout=120)
        except OSError:
            self.alive()
            raise
        if status != 200:
            raise RuntimeError(f"{rid}: /prompt refused a soak prompt ({status}): {json.dumps(body)[:500]}")
        rec["ids"].append((self.server.name, body["prompt_id"]))

    def poll(self) -> int | None:
        """Record finished history entries of the current server; returns the number still pending (None when the
        server did not answer in time)."""
        try:
            hist = self.server.get("/history", timeout=120)
        except OSError:
            self.alive()
            return None
        pending = 0
        for rec in self.records.values():
            if rec["entry"] is not None or not rec["ids"]:
                continue
            srv, pid = rec["ids"][-1]
            if srv != self.server.name:
                continue
            e = hist.get(pid)
            if e and e.get("status", {}).get("completed") is not None:
                rec["entry"], rec["server"] = e, srv
            else:
                pending += 1
        return pending

    def done(self) -> int:
        return sum(r["entry"] is not None for r in self.records.values())

    def drain(self, interrupt_every: float | None, stop_after: int | None = None) -> None:
        """Poll until nothing is pending (or, with ``stop_after``, until that many more have finished), posting
        /interrupt now and then; a server that dies on the way is replaced and its prompts queued again."""
        rng = random.Random(len(self.records))
        done0 = self.done()
        next_interrupt = time.time() + (interrupt_every or 1e9) * rng.uniform(0.5, 1.5)
        while True:
            try:
                pending = self.poll()
                self.alive()
            except ServerDied as e:
                self.restart(f"after the server died ({str(e)[:200]})")
                continue
            if pending == 0 or (stop_after is not None and self.done() - done0 >= stop_after):
                return
            if time.time() >= next_interrupt:
                self.server.interrupt()
                self.interrupts += 1
                next_interrupt = time.time() + interrupt_every * rng.uniform(0.5, 1.5)
            time.sleep(3.0)


def classify(rec: dict) -> str:
    e = rec["entry"]
    if e is None:
        return "lost"
    status = e.get("status", {})
    msgs = status.get("messages", [])
    if any(kind == "execution_interrupted" for kind, _ in msgs):
        return "interrupted"
    if status.get("status_str") == "success":
        outs = e.get("outputs", {}).values()
        ok = any(out.get("images") for out in outs) or any(  # Save Fused / Export LoRA: the files they wrote
            ".safetensors" in t for out in outs for t in out.get("text", []))
        return "completed" if ok else "completed_without_image"
    err = next((d for kind, d in msgs if kind == "execution_error"), None)
    if err and any(s in f"{err.get('exception_message', '')}" for s in CLEAR_ERROR):
        return "failed_clear"
    return "failed_unclear"


def what_went_wrong(rid: str, rec: dict) -> str:
    """One line on a prompt the soak counts against the pack: its workflow, and the error the server reported."""
    e = rec["entry"] or {}
    err = next((d for kind, d in e.get("status", {}).get("messages", []) if kind == "execution_error"), {})
    return (f"{rid} {rec['kind']} (server {rec['server']}): [{err.get('node_id')} {err.get('node_type')}] "
            f"{err.get('exception_type')}: {str(err.get('exception_message', ''))[:300]}")


def image_pixels(out_dir: Path, entry: dict):
    import numpy as np
    from PIL import Image
    imgs = [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])
            if img.get("type") == "output"]
    return [np.asarray(Image.open(out_dir / i.get("subfolder", "") / i["filename"])) for i in imgs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--interrupt-every", type=float, default=40.0, help="seconds between /interrupt posts (about)")
    ap.add_argument("--compare", type=int, default=12, help="completed prompts re-run on a fresh server")
    ap.add_argument("--server-args", default="--bf16-unet",
                    help="extra ComfyUI arguments of every server (default: the UNet stored in bf16, so a server with "
                         "a fused SD1.5 model and its backup stays near 5 GB on a shared CPU machine)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from tests.e2e.workflows import API_DIR, load_api, small as small_of
    from tools import standins
    from tools.standin_prompts import family_of

    def small(p):  # every SD workflow on the SD1.5 stand-in (the SDXL ones too), one image a prompt
        return small_of(p, size=args.size, batch=1, ckpt="fewstep-standin-sd15.safetensors")
    t_start = time.time()
    rng = random.Random(1234)
    # The SD workflows (the flow families' ones name real DiT files; tests/e2e runs them on their stand-ins).
    workflows = sorted(f.name for f in API_DIR.glob("*.json") if family_of(json.loads(f.read_text())) is None)
    failing = failing_prompts(small)
    with tempfile.TemporaryDirectory(prefix="fewstep-soak-") as tmp:
        tmp = Path(tmp)
        models = loras_folder(standins.ensure(("sd15",)), tmp)
        soak = Soak(models, tmp / "out", tuple(args.server_args.split()))
        per_round = -(-args.prompts // args.rounds)
        restart_round = args.rounds // 2
        soak.start("A")
        n, written_gb = 0, 0.0
        for rnd in range(args.rounds):
            queued = 0
            while queued < per_round and n < args.prompts:
                rid = f"p{n:04d}"
                if n % FAIL_EVERY == FAIL_EVERY - 1:
                    kind, prompt = failing[(n // FAIL_EVERY) % len(failing)]
                else:
                    kind = workflows[(n // RUN) % len(workflows)]
                    prompt = small(load_api(kind))
                seed = rng.randrange(2 ** 32)
                soak.records[rid] = {"prompt": prompt_seed_inputs(prompt, seed), "kind": kind, "seed": seed,
                                     "ids": [], "entry": None, "server": None, "round": rnd}
                try:
                    soak.submit(rid)
                except ServerDied as e:
                    soak.restart(f"after the server died ({str(e)[:200]})")  # queues this one again too
                queued += 1
                n += 1
            interrupt = args.interrupt_every if rnd > 0 else None  # round 0 is the clean warm-up
            if rnd == restart_round:
                soak.drain(interrupt, stop_after=max(3, queued // 4))
                soak.restart("planned, mid-queue")
            soak.drain(interrupt)
            for f in soak.out_dir.rglob("*.safetensors"):  # Save Fused's checkpoints (GBs each): checked, then freed
                written_gb += f.stat().st_size / 2**30
                f.unlink()
            soak.rss[soak.server.name].append(soak.rss_mb())
            counts: dict[str, int] = {}
            for r in soak.records.values():
                counts[classify(r)] = counts.get(classify(r), 0) + 1
            print(f"round {rnd} done at {time.time() - t_start:.0f} s: {counts}; RSS MB {soak.rss}", flush=True)
        soak.server.stop()

        # A fresh server re-runs a sample of the completed prompts: the images must be equal.
        done = [rid for rid, r in soak.records.items() if classify(r) == "completed"]
        late = sorted(done, key=lambda rid: -soak.records[rid]["round"])
        sample = []
        for kind in workflows:  # the latest ones of each workflow first
            sample += [rid for rid in late if soak.records[rid]["kind"] == kind][:max(1, args.compare // len(workflows))]
        sample = sample[:args.compare]
        soak.start("fresh")
        equal, differ = 0, []
        for rid in sample:
            rec = soak.records[rid]
            entry = soak.server.wait(soak.server.submit(rec["prompt"]), 1800, poll_timeout=120)
            a, b = image_pixels(soak.out_dir, rec["entry"]), image_pixels(soak.out_dir, entry)
            if len(a) == len(b) and all((x.shape == y.shape) and (x == y).all() for x, y in zip(a, b)):
                equal += 1
            else:
                differ.append(f"{rid} ({rec['kind']}, seed {rec['seed']}, server {rec['server']})")
        soak.server.stop()

    outcome = {}
    for r in soak.records.values():
        c = classify(r)
        outcome[c] = outcome.get(c, 0) + 1
    growth = {s: (round(v[-1] - v[0], 1) if len(v) > 1 else 0.0) for s, v in soak.rss.items() if s != "fresh"}
    fig = {"prompts": len(soak.records), "workflows": workflows, "outcomes": outcome, "interrupts_posted":
           soak.interrupts, "restarts": soak.restarts,
           "requeued_after_restart": sum(1 for r in soak.records.values() if r.get("requeued")),
           "rss_mb": {s: [round(x) for x in v] for s, v in soak.rss.items()}, "rss_growth_mb": growth,
           "fresh_server_equal": equal, "fresh_server_compared": len(sample), "differ": differ,
           "server_args": args.server_args, "wall_s": round(time.time() - t_start),
           "files_written_gb": round(written_gb, 1),
           "not_clear": [what_went_wrong(rid, r) for rid, r in soak.records.items()
                         if classify(r) in ("failed_unclear", "completed_without_image", "lost")]}
    print(json.dumps(fig, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    bad = outcome.get("lost", 0) + outcome.get("failed_unclear", 0) + outcome.get("completed_without_image", 0)
    return 1 if bad or differ else 0


if __name__ == "__main__":
    sys.exit(main())
