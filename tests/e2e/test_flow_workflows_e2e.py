"""Real server: the flow families' workflows (workflows/) and every flow preset, end to end on the stand-ins.

* Each family's workflow (Wan 2.2 two-expert, Qwen-Image-Lightning, FLUX.1 Turbo-Alpha, PCM-SD3) is converted from its
  UI file as the frontend's graphToPrompt does, rewritten for the stand-ins by ``tools.standin_prompts.on_standins``
  and run; it must write its images (frames for Wan), finite and not flat. The workflows name the real files and
  the real text-encoder loaders (CLIPLoader / DualCLIPLoader / TripleCLIPLoader); the text encoders are far too
  large for CI, so here -- in tests only -- each CLIPTextEncode becomes the test-only FewStepTestConditioning node
  (tests/custom_nodes, loaded by ``Server(test_nodes=True)``), and real diffusion models, VAEs and LoRAs become their
  stand-ins (a LoRA without a stand-in in this checkout is left out, and said).
* Every flow preset runs from the plain KSampler (FewStep Settings + sampler/scheduler ``fewstep_auto``), from
  SamplerCustom (FewStep Preset) and from SamplerCustomAdvanced (FewStep Preset + FewStep Noise + CFGGuider; for the
  Flux presets that path is the Flux workflow's); Wan 2.2 Lightning runs its two experts: two KSamplerAdvanced,
  FewStep Two-Expert Sampler, and SplitSigmas + two SamplerCustomAdvanced. Each run saves its latent (SaveLatent),
  which must have the family's shape and be finite; the KSampler and SamplerCustom runs of a preset must agree.

Everything goes to one server (``flow_server``): all prompts are queued at once and the server runs them in turn,
its cache keeping each stand-in loaded once.
"""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from tools import standin_prompts as S
from tools import workflows as W

pytestmark = pytest.mark.e2e

FLOW_WORKFLOWS = sorted(n for n in (p.stem for p in W.API_DIR.glob("*.json"))
                        if S.family_of(json.loads((W.API_DIR / f"{n}.json").read_text())) is not None)
# The flow presets of the model-card table -> (stand-in family, the stand-in models it runs on).
FLOW_PRESETS = {
    "Hyper-SD3 4-step": ("sd3", ("model",)), "Hyper-SD3 8-step": ("sd3", ("model",)),
    "Hyper-SD3 16-step": ("sd3", ("model",)), "PCM-SD3 4-step": ("sd3", ("model",)),
    "PCM-SD3 stochastic 4-step": ("sd3", ("model",)),
    "Hyper-FLUX 8-step": ("flux", ("model",)), "Hyper-FLUX 16-step": ("flux", ("model",)),
    "FLUX.1 Turbo-Alpha 8-step": ("flux", ("model",)),
    "Wan 2.1 lightx2v 4-step": ("wan", ("t2v",)), "Wan 2.1 CausVid": ("wan", ("t2v",)),
    "Wan 2.2 Lightning 4-step": ("wan", ("high_noise", "low_noise")),
    "Qwen-Image-Lightning 4-step": ("qwen_image", ("model",)), "Qwen-Image-Lightning 8-step": ("qwen_image", ("model",)),
    "HunyuanVideo FastVideo": ("hunyuan_video", ("model",)),
}
PATHS = ("ksampler", "samplercustom", "samplercustomadvanced")
# The Flux stand-in is the widest (the host fixes Flux's head count): about 2 s a step on a CPU. Its presets run from
# KSampler and SamplerCustom here; SamplerCustomAdvanced with a Flux preset is the family workflow's own path.
RUNS = [(name, path) for name, (fam, _) in FLOW_PRESETS.items() for path in PATHS
        if not (fam == "flux" and path == "samplercustomadvanced")]
GUIDANCE = {"flux": 3.5, "hunyuan_video": 6.0}  # FluxGuidance values of the families' core workflows
SEED = 11


def load_api(name: str) -> dict:
    return json.loads((W.API_DIR / f"{name}.json").read_text())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def seconds(entry: dict) -> float | None:
    """Run time from the server's own execution_start / execution_success timestamps (ms)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    if stamps.get("execution_start") and stamps.get("execution_success"):
        return (stamps["execution_success"] - stamps["execution_start"]) / 1000
    return None


def run_all(server, prompts: dict[str, dict], timeout: float = 900) -> dict[str, dict]:
    """Queue every prompt at once, then wait for each: {key: history entry} (a rejected prompt: {"rejected": body})."""
    ids, out = {}, {}
    for key, prompt in prompts.items():
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": "fewstep-tests-flow"})
        if status == 200:
            ids[key] = body["prompt_id"]
        else:
            out[key] = {"rejected": body}
    deadline = time.time() + timeout
    for key, pid in ids.items():
        out[key] = server.wait(pid, max(1.0, deadline - time.time()), poll_timeout=120)
    return out


def check_entry(server, entry: dict, what: str) -> None:
    from tools import hostenv
    assert "rejected" not in entry, f"{what}: /prompt rejected it: {json.dumps(entry.get('rejected'))[:1500]}"
    assert entry["status"]["status_str"] == "success", (
        f"{what}: {hostenv.error_message(entry)}\n{server.log_tail(30)}")


# ---------------------------------------------------------------- the workflows' files and notes (no server)

def test_there_is_one_workflow_per_flow_family():
    assert {S.family_of(load_api(n)) for n in FLOW_WORKFLOWS} == {"wan", "qwen_image", "flux", "sd3"}, FLOW_WORKFLOWS


@pytest.mark.parametrize("name", FLOW_WORKFLOWS)
def test_note_names_every_file_under_its_models_folder(name):
    """The Note (workflows/notes/<name>.md, shown in the UI file) names each file a loader asks for, on the line of
    the models folder the loader reads."""
    note = W.note_text(name)
    assert note, f"workflows/notes/{name}.md is missing"
    folders = {"unet_name": "diffusion_models/", "vae_name": "vae/", "lora_name": "loras/", "clip_name": "text_encoders/",
               "clip_name1": "text_encoders/", "clip_name2": "text_encoders/", "clip_name3": "text_encoders/"}
    ui_notes = [n for n in json.loads(W.ui_path(name).read_text())["nodes"] if n["type"] == "Note"]
    assert [n["widgets_values"] for n in ui_notes] == [[note]], "the UI workflow must carry the note"
    lines = note.splitlines()
    for node in load_api(name).values():
        for key, folder in folders.items():
            file = node["inputs"].get(key)
            if isinstance(file, str):
                hits = [line for line in lines if file in line]
                assert hits and all(line.startswith(f"- {folder}") for line in hits), (name, file, folder, hits)


@pytest.mark.parametrize("name", FLOW_WORKFLOWS)
def test_standin_rewrite_leaves_no_real_file_and_no_text_encoder(name):
    prompt, notes = S.on_standins(load_api(name))
    real = set(S.DIFFUSION_MODELS) | set(S.VAES) | set(S.LORAS)
    for node in prompt.values():
        assert node["class_type"] not in S.TEXT_ENCODER_LOADERS and node["class_type"] != "CLIPTextEncode"
        assert not real & {v for v in node["inputs"].values() if isinstance(v, str)}, node
    kept_loras = [n for n in prompt.values() if n["class_type"] == "LoraLoaderModelOnly"]
    original = [n for n in load_api(name).values() if n["class_type"] == "LoraLoaderModelOnly"]
    assert len(kept_loras) + len(notes) == len(original), (notes, kept_loras)
    print(f"{name}: {len(kept_loras)} LoRA(s) on stand-ins; " + ("; ".join(notes) or "none left out"))


# ---------------------------------------------------------------- the workflows on the server

@pytest.fixture(scope="module")
def object_info(flow_server):
    return flow_server.get("/object_info")


@pytest.fixture(scope="module")
def workflow_runs(flow_server, object_info):
    prompts = {}
    for name in FLOW_WORKFLOWS:
        ui = json.loads(W.ui_path(name).read_text())
        api = W.ui_to_api(ui, object_info)  # what the frontend sends for the UI file
        assert api == {str(k): v for k, v in load_api(name).items()}
        prompts[name] = S.on_standins(api)[0]
    return run_all(flow_server, prompts)


@pytest.mark.parametrize("name", FLOW_WORKFLOWS)
def test_family_workflow_writes_its_images(flow_server, workflow_runs, name):
    import numpy as np
    from PIL import Image, ImageSequence
    entry = workflow_runs[name]
    check_entry(flow_server, entry, name)
    paths = flow_server.images(entry)
    assert paths, entry.get("outputs")
    frames = []
    for path in paths:
        with Image.open(path) as im:
            frames += [np.asarray(f.convert("RGB")).astype(np.float32) for f in ImageSequence.Iterator(im)]
    video = S.family_of(load_api(name)) == "wan"
    assert len(frames) == (5 if video else 1), (name, len(frames))  # 5 frames = 2 latent frames of the Wan VAE
    for arr in frames:
        assert np.isfinite(arr).all() and arr.std() > 1.0, f"{name}: a flat frame (NaN/Inf decoded to a constant)"
    print(f"{name}: {len(frames)} frame(s) {frames[0].shape} in {seconds(entry)} s on the server")


# ---------------------------------------------------------------- every flow preset, three ways

class Graph:
    """A tiny API-prompt builder: ``add(class_type, **inputs)`` returns the node id; links are ``[id, slot]``."""

    def __init__(self, object_info: dict):
        self.nodes: dict[str, dict] = {}
        self.info = object_info

    def add(self, class_type: str, **inputs) -> str:
        spec = self.info[class_type]  # widgets left out take their defaults (e.g. inputs a newer node added)
        for section in ("required", "optional"):
            for key, raw in spec["input"].get(section, {}).items():
                opts = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
                if key not in inputs and "default" in opts:
                    inputs[key] = opts["default"]
        key = str(len(self.nodes) + 1)
        self.nodes[key] = {"class_type": class_type, "inputs": inputs}
        return key


def preset_graph(name: str, path: str, object_info: dict) -> dict:
    from fewstep.samplers import presets
    from tools import standins
    preset = presets.get_preset(name)
    fam_key, roles = FLOW_PRESETS[name]
    fam = standins.family(fam_key)
    g = Graph(object_info)
    models = [[g.add("UNETLoader", unet_name=fam.models[r].name, weight_dtype="default"), 0] for r in roles]
    pos = [g.add("FewStepTestConditioning", family=fam_key, seed=1, tokens=8), 0]
    neg = [g.add("FewStepTestConditioning", family=fam_key, seed=2, tokens=8), 0]
    if fam_key in GUIDANCE:
        guidance = getattr(preset, "guidance", None) or GUIDANCE[fam_key]
        pos = [g.add("FluxGuidance", conditioning=pos, guidance=float(guidance)), 0]
    latent = [g.add(fam.latent[0], **fam.latent[1]), 0]
    out = two_expert_stages(g, preset, path, models, pos, neg, latent) if len(models) == 2 else \
        one_model_stage(g, preset, path, models[0], pos, neg, latent)
    g.add("SaveLatent", samples=out, filename_prefix=f"presets/{slug(name)}_{path}")
    return g.nodes


def one_model_stage(g: Graph, preset, path: str, model, pos, neg, latent) -> list:
    if path == "ksampler":
        patched = [g.add("FewStepSettings", model=model, preset=preset.name), 0]
        return [g.add("KSampler", model=patched, seed=SEED, steps=preset.steps, cfg=float(preset.cfg),
                      sampler_name="fewstep_auto", scheduler="fewstep_auto", positive=pos, negative=neg,
                      latent_image=latent, denoise=1.0), 0]
    p = g.add("FewStepPreset", model=model, preset=preset.name)
    if path == "samplercustom":
        return [g.add("SamplerCustom", model=model, add_noise=True, noise_seed=SEED, cfg=[p, 2], positive=pos,
                      negative=neg, sampler=[p, 0], sigmas=[p, 1], latent_image=latent), 0]
    guider = g.add("CFGGuider", model=model, positive=pos, negative=neg, cfg=[p, 2])
    return [g.add("SamplerCustomAdvanced", noise=[g.add("FewStepNoise", noise_seed=SEED), 0], guider=[guider, 0],
                  sampler=[p, 0], sigmas=[p, 1], latent_image=latent), 0]


def boundary(preset) -> int:
    from fewstep.samplers import presets
    fn = getattr(presets, "preset_boundary", None)
    return int(fn(preset, preset.steps)) if fn is not None else preset.steps // 2


def two_expert_stages(g: Graph, preset, path: str, models, pos, neg, latent) -> list:
    high, low = models
    b = boundary(preset)
    if path == "ksampler":  # core's way with the plain sampler: two KSamplerAdvanced on FewStep Settings models
        common = dict(noise_seed=SEED, steps=preset.steps, cfg=float(preset.cfg), sampler_name="fewstep_auto",
                      scheduler="fewstep_auto", positive=pos, negative=neg)
        h = [g.add("FewStepSettings", model=high, preset=preset.name), 0]
        lo = [g.add("FewStepSettings", model=low, preset=preset.name), 0]
        mid = g.add("KSamplerAdvanced", model=h, add_noise="enable", latent_image=latent, start_at_step=0,
                    end_at_step=b, return_with_leftover_noise="enable", **common)
        return [g.add("KSamplerAdvanced", model=lo, add_noise="disable", latent_image=[mid, 0], start_at_step=b,
                      end_at_step=10000, return_with_leftover_noise="disable", **common), 0]
    p = g.add("FewStepPreset", model=high, preset=preset.name)
    if path == "samplercustom":  # the pack's node
        return [g.add("FewStepTwoExpertSampler", model_high=high, model_low=low, add_noise=True, noise_seed=SEED,
                      cfg_high=[p, 2], cfg_low=[p, 2], positive=pos, negative=neg, sampler=[p, 0], sigmas=[p, 1],
                      boundary_step=b, latent_image=latent), 0]
    split = g.add("SplitSigmas", sigmas=[p, 1], step=b)  # core's way with custom sampling
    mid = g.add("SamplerCustomAdvanced", noise=[g.add("FewStepNoise", noise_seed=SEED), 0],
                guider=[g.add("CFGGuider", model=high, positive=pos, negative=neg, cfg=[p, 2]), 0],
                sampler=[p, 0], sigmas=[split, 0], latent_image=latent)
    return [g.add("SamplerCustomAdvanced", noise=[g.add("DisableNoise"), 0],
                  guider=[g.add("CFGGuider", model=low, positive=pos, negative=neg, cfg=[p, 2]), 0],
                  sampler=[p, 0], sigmas=[split, 1], latent_image=[mid, 0]), 0]


def available_presets() -> list[str]:
    from fewstep.samplers import presets
    return [n for n in FLOW_PRESETS if n in presets.PRESET_NAMES]


@pytest.fixture(scope="module")
def preset_runs(flow_server, object_info):
    names = available_presets()
    prompts = {(name, path): preset_graph(name, path, object_info) for name, path in RUNS if name in names}
    t0 = time.time()
    runs = run_all(flow_server, prompts)
    print(f"{len(prompts)} preset runs in {time.time() - t0:.1f} s")
    return runs


def test_the_preset_table_covers_the_flow_presets():
    """Every flow preset of the pack's table is exercised here (a new flow preset needs its row above)."""
    from fewstep.samplers import presets
    flow = [p.name for p in presets.PRESETS if getattr(p, "flow", False)]
    missing = sorted(set(flow) - set(FLOW_PRESETS))
    assert not missing, f"flow presets without an e2e row: {missing}"
    for name in available_presets():
        bases = getattr(presets.get_preset(name), "bases", ())
        assert not bases or FLOW_PRESETS[name][0] in bases, (name, bases)


def saved_latent(server, entry: dict) -> torch.Tensor:
    from safetensors.torch import load_file
    files = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    assert len(files) == 1, entry["outputs"]
    return load_file(str(server.output_dir / files[0]["subfolder"] / files[0]["filename"]))["latent_tensor"]


def preset_run(preset_runs, name: str, path: str) -> dict:
    if (name, path) not in preset_runs:
        reason = f"preset {name!r} is not in this checkout's preset table (samplers/presets.py)"
        print(reason)
        pytest.skip(reason)
    return preset_runs[(name, path)]


@pytest.mark.parametrize("name,path", RUNS)
def test_preset_runs_end_to_end_on_its_standin(flow_server, preset_runs, name, path):
    from tools import standins
    entry = preset_run(preset_runs, name, path)
    check_entry(flow_server, entry, f"{name} via {path}")
    latent = saved_latent(flow_server, entry)
    fam = standins.family(FLOW_PRESETS[name][0])
    shape = tuple(fam.latent_shape)
    assert tuple(latent.shape) == (shape if len(shape) == latent.ndim else (shape[0], shape[1], 1, *shape[2:])), (
        latent.shape, shape)
    assert torch.isfinite(latent).all() and 0.0 < float(latent.std()) < 1e3, (name, path, float(latent.std()))
    print(f"{name} via {path}: latent {tuple(latent.shape)} std {float(latent.std()):.3f} in {seconds(entry)} s")


@pytest.mark.parametrize("name", list(FLOW_PRESETS))
def test_ksampler_and_samplercustom_run_the_same_preset_alike(flow_server, preset_runs, name):
    """FewStep Settings + KSampler (fewstep_auto) and FewStep Preset + SamplerCustom draw the same noise from the same
    seed and must run the same sampler on the same sigmas: the same latent (for Wan 2.2: two KSamplerAdvanced vs
    FewStep Two-Expert Sampler)."""
    runs = [preset_run(preset_runs, name, path) for path in ("ksampler", "samplercustom")]
    for entry, path in zip(runs, ("ksampler", "samplercustom")):
        check_entry(flow_server, entry, f"{name} via {path}")
    a, b = (saved_latent(flow_server, e) for e in runs)
    scale = max(1.0, float(a.abs().max()))
    assert float((a - b).abs().max()) <= 1e-5 * scale, (name, float((a - b).abs().max()))
