"""LoRA nodes, save side: FewStep Save Fused and FewStep Export LoRA.

* FewStep Save Fused -> a ``.safetensors`` checkpoint with the fuse settings in its metadata, plus the prompt and
  workflow as ComfyUI's own checkpoint save writes them.
* FewStep Export LoRA -> what the model's patches add to its base, as one kohya LoRA by randomized SVD (rank or
  energy), with a report of the per-key relative Frobenius error.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import torch
from comfy_api.v0_0_2 import io

from .common import CATEGORIES, checked, model_base
from .lora_host import fuse_records, plain_fuse_patch
from .validate import check_prefix, saved_text, validated

LOG = logging.getLogger("fewstep")

SAVE = "FewStep Save Fused"
EXPORT = "FewStep Export LoRA"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# modelspec.architecture written for a family (as core's checkpoint save does; it writes none for the other DiTs)
MODELSPEC = {"sdxl": "stable-diffusion-xl-v1-base", "sd3": "stable-diffusion-v3-medium"}


# ---------------------------------------------------------------- writing a file

HEADER_SLACK = 1 << 20  # room for the safetensors header and metadata (the workflow JSON)


def check_room(node: str, path: str, nbytes: int) -> None:
    """Refuse, before any work, a file of ``nbytes`` that the disk of ``path``'s folder cannot hold."""
    import shutil
    need = nbytes + HEADER_SLACK
    free = shutil.disk_usage(os.path.dirname(path)).free
    if free < need:
        raise ValueError(f"{node}: {os.path.basename(path)} needs {need / 2**30:.2f} GiB, but the disk of "
                         f"{os.path.dirname(path)} has {free / 2**30:.2f} GiB free; free some space or choose "
                         f"another output folder (ComfyUI's --output-directory)")


def written(node: str, path: str, write) -> None:
    """``write()`` the file ``path`` (its room checked by the caller, ``check_room``): a failed write (disk full,
    permissions) leaves no partial file and is an error naming the node and the file."""
    try:
        write()
    except Exception as e:  # OSError, safetensors' SafetensorError (not an OSError) on a full or vanishing disk
        if isinstance(e, ValueError) and str(e).startswith(node):
            raise
        try:
            os.remove(path)
        except OSError:
            pass
        raise ValueError(f"{node}: writing {os.path.basename(path)} to {os.path.dirname(path)} failed, nothing "
                         f"was kept: {str(e).strip()[:300]}") from None


# ---------------------------------------------------------------- FewStep Save Fused

@validated(filename_prefix=check_prefix)
class FewStepSaveFused(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepSaveFused", display_name=SAVE, category=CATEGORIES["save"], is_output_node=True,
            description="Saves the fused model (and optionally CLIP and VAE) as a .safetensors checkpoint in the "
                        "output folder, with the fused adapters and fuse settings in its metadata, and the prompt "
                        "and workflow as core Save Checkpoint writes them.",
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            inputs=[io.Model.Input("model", tooltip="Model from FewStep LoRA Fuse (any MODEL works)."),
                    io.Clip.Input("clip", optional=True, tooltip="Optional CLIP to include in the checkpoint."),
                    io.Vae.Input("vae", optional=True, tooltip="Optional VAE to include in the checkpoint."),
                    io.String.Input("filename_prefix", default="checkpoints/fewstep_fused",
                                    tooltip="Path under the output folder; a counter and .safetensors are added."),
                    io.Combo.Input("dtype", options=list(DTYPES), default="fp16",
                                   tooltip="Stored dtype of the floating-point weights (fused in fp32, rounded "
                                           "once into this).")],
            outputs=[io.String.Output(display_name="path", tooltip="Path of the saved file.")])

    @classmethod
    def execute(cls, model, filename_prefix, dtype, clip=None, vae=None) -> io.NodeOutput:
        path = save_fused(model, filename_prefix, dtype, clip=clip, vae=vae, prompt=cls.hidden.prompt,
                          extra_pnginfo=cls.hidden.extra_pnginfo)
        return io.NodeOutput(path, ui={"text": [f"{SAVE}: wrote {saved_text(path)}"]})  # shown in the UI, history


def workflow_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """The ``prompt`` and workflow (``extra_pnginfo``: ``workflow``, ...) metadata, JSON-encoded, as ComfyUI's
    own checkpoint save writes them; nothing when the host runs with ``--disable-metadata``."""
    from comfy.cli_args import args
    if args.disable_metadata:
        return {}
    meta = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    meta.update({k: json.dumps(v) for k, v in (extra_pnginfo or {}).items()})
    return meta


def save_fused(model, filename_prefix: str, dtype: str, clip=None, vae=None, prompt=None, extra_pnginfo=None,
               output_dir: str | None = None) -> str:
    import comfy.model_management
    import comfy.utils
    import folder_paths
    node = SAVE
    if dtype not in DTYPES:
        raise ValueError(f"{node}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out_dir = output_dir or folder_paths.get_output_directory()
    checked(node, check_prefix, filename_prefix, out_dir)
    try:
        folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    except Exception as e:
        raise ValueError(f"{node}: filename_prefix {filename_prefix!r}: {e}") from None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
    records = fuse_records(model)
    # The records hold file names and settings only: local paths stay out of a file people share.
    metadata = {"fewstep.fuse": json.dumps([r.to_json() for r in records]), "fewstep.dtype": dtype,
                "fewstep.other_patched_weights": str(len(foreign_patched_keys(model))),
                "fewstep.adapters": ", ".join(f"{a.role}:{a.name}@{a.strength:g}"
                                              for r in records for a in r.adapters)}
    arch = MODELSPEC.get(model_base(model))
    if arch:
        metadata.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
                         "modelspec.implementation": "sgm", "modelspec.title": f"{filename} {counter}"})
    metadata.update(workflow_metadata(prompt, extra_pnginfo))
    # The checkpoint's size in ``dtype`` (floating tensors converted), checked before the host patches anything.
    parts = [model.model.state_dict()] + [x.get_sd() for x in (clip, vae) if x is not None]
    check_room(node, path, sum(t.numel() * (DTYPES[dtype].itemsize if t.is_floating_point() else t.element_size())
                               for sd in parts for t in sd.values()))
    del parts
    load = [model] + ([clip.load_model()] if clip is not None else [])
    comfy.model_management.load_models_gpu(load, force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip.get_sd() if clip is not None else None,
                                           vae.get_sd() if vae is not None else None, None)
    want = DTYPES[dtype]
    sd = dict(with_progress(((k, (t.to(want) if t.is_floating_point() else t).contiguous()) for k, t in sd.items()),
                            len(sd)))
    written(node, path, lambda: comfy.utils.save_torch_file(sd, path, metadata=metadata))
    LOG.info("%s: saved %d tensors (%s) to %s", node, len(sd), dtype, path)
    return path


# ---------------------------------------------------------------- FewStep Export LoRA

@validated(filename_prefix=check_prefix)
class FewStepExportLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepExportLora", display_name=EXPORT, category=CATEGORIES["save"], is_output_node=True,
            description="Exports what the model's patches add to its base (FewStep LoRA Fuse's acceleration + "
                        "merged styles, and any core LoRA loaders chained with it) as one kohya LoRA by "
                        "seeded randomized SVD, at a fixed rank or an energy threshold, with the text-encoder part "
                        "when the fused clip is connected. The report lists the overall and worst per-key relative "
                        "Frobenius errors.",
            inputs=[io.Model.Input("model", tooltip="Model from FewStep LoRA Fuse. Everything patched onto it is "
                                                    "exported: the fuse's deltas exactly (recomputed from the "
                                                    "files), and patches of other nodes (e.g. a core LoRA loader "
                                                    "before or after the fuse) as the host applies them."),
                    io.Combo.Input("mode", options=["rank", "energy"], default="rank",
                                   tooltip="rank = fixed rank for every weight; energy = smallest rank keeping "
                                           "this fraction of each delta's Frobenius norm."),
                    io.Int.Input("rank", default=64, min=1, max=1024,
                                 tooltip="Rank in 'rank' mode; the rank cap in 'energy' mode."),
                    io.Float.Input("energy", default=0.99, min=0.5, max=1.0, step=0.001,
                                   tooltip="Energy mode: kept fraction sqrt(sum of kept sigma^2 / total)."),
                    io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                                   tooltip="Stored dtype of the LoRA factors (errors are measured after the cast)."),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                 tooltip="Seed of the randomized SVD sketch (same seed, same file)."),
                    io.String.Input("filename_prefix", default="loras/fewstep_export",
                                    tooltip="Path under the output folder; a counter and .safetensors are added."),
                    io.Clip.Input("clip", optional=True,
                                  tooltip="Optional: the clip output of FewStep LoRA Fuse. Its text-encoder "
                                          "patches are exported too (as lora_te* modules); without it the export "
                                          "holds the UNet part only and the report says what was left out.")],
            outputs=[io.String.Output(display_name="report", tooltip="Errors of the export and the file path.")])

    @classmethod
    def execute(cls, model, mode, rank, energy, dtype, seed, filename_prefix, clip=None) -> io.NodeOutput:
        _path, report = export_fused(model, mode=mode, rank=rank, energy=energy, dtype=dtype, seed=seed,
                                     filename_prefix=filename_prefix, clip=clip)
        return io.NodeOutput(report, ui={"text": [report]})


def with_progress(items, total: int):
    """``items`` passed through while the host's progress bar (the running node's) advances once per item taken."""
    import comfy.utils
    bar = comfy.utils.ProgressBar(max(1, total))
    for i, item in enumerate(items, 1):
        yield item
        bar.update_absolute(i)


def fused_deltas(node: str, model) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, fp32 delta) for every weight patch ``model`` carries, one key at a time (nothing accumulated).

    A key patched only by FewStep LoRA Fuse nodes gives the sum of their exact fp32 deltas. A key that also carries
    other patches (core LoRA loaders before or after the fuse, model merges) gives what the host applies: its own
    ``calculate_weight`` over the key's whole patch list, minus the unpatched weight. So the export is the model's
    whole difference from its base, never the fuse's part alone."""
    import comfy.lora
    import comfy.utils
    keys = sorted(k for k, ps in model.patches.items() if ps)
    if not keys:
        raise ValueError(f"{node}: the model carries no weight patches; connect the MODEL output of FewStep LoRA "
                         "Fuse (or of LoRA loaders)")

    def gen():
        for k in keys:
            ps = model.patches[k]
            if all(plain_fuse_patch(p) for p in ps):
                d = None
                for p in ps:
                    try:
                        x = p[1].compute(device=None)
                    except ValueError as e:
                        raise ValueError(f"{node}: {e}") from None
                    d = x if d is None else (d if x is None else d + x)
                if d is not None:
                    yield k, d
                continue
            bk = model.backup.get(k)
            w = (bk.weight if bk is not None else comfy.utils.get_attr(model.model, k)).to(torch.float32)
            yield k, comfy.lora.calculate_weight(ps, w.clone(), k) - w
    return gen()


def foreign_patched_keys(model) -> list[str]:
    """Weights of ``model`` with patches from other nodes than FewStep LoRA Fuse (e.g. core LoRA loaders)."""
    return sorted(k for k, ps in model.patches.items() if ps and not all(plain_fuse_patch(p) for p in ps))


def kohya_te_names(clip_key_map: dict[str, str]) -> dict[str, str]:
    """CLIP weight key -> the kohya module name kohya writes for it, from the host's CLIP key map (lora key -> weight).

    The host maps several spellings onto one weight: ``lora_te_*`` (one encoder: SD1.x/2.x) and
    ``lora_te1_*``/``lora_te2_*`` (SDXL's two; the host also accepts ``lora_te1_`` for SD1.x). The model has two
    encoders exactly when some ``lora_te2_`` name exists. A weight with no name of the preferred family (e.g. SD1.x
    ``text_projection``, only ``lora_te1_``) keeps the name the host has for it."""
    kohya = [(lk, hk) for lk, hk in clip_key_map.items() if lk.startswith("lora_te")]
    two_encoders = any(lk.startswith("lora_te2_") for lk, _ in kohya)
    fallback: dict[str, str] = {}
    for lk, hk in kohya:
        fallback.setdefault(hk, lk)
    preferred = {hk: lk for lk, hk in kohya if lk.startswith(("lora_te1_", "lora_te2_")) == two_encoders}
    return {**fallback, **preferred}


def clip_deltas(clip) -> tuple[list[str], list[str], dict[str, str], Iterator[tuple[str, torch.Tensor]]]:
    """(exported CLIP keys, patched keys with no kohya name, key -> kohya ``lora_te*`` module name, iterator of
    (key, fp32 delta)) for the weight patches ``clip`` carries; a delta is the host's own patch result minus the
    unpatched weight."""
    import comfy.lora
    import comfy.utils
    p = clip.patcher
    names = kohya_te_names(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}))
    keys = sorted(k for k in p.patches if k in names)
    unnamed = sorted(k for k in p.patches if k not in names)

    def gen():
        for k in keys:
            bk = p.backup.get(k)
            w = (bk.weight if bk is not None else comfy.utils.get_attr(p.model, k)).to(torch.float32)
            out = comfy.lora.calculate_weight(p.patches[k], w.clone(), k)
            yield k, out - w
    return keys, unnamed, names, gen()


def export_fused(model, *, mode="rank", rank=64, energy=0.99, dtype="fp16", seed=0,
                 filename_prefix="loras/fewstep_export", output_dir: str | None = None, method="randomized",
                 clip=None):
    """The node body: returns (path, report). With ``clip`` its text-encoder patches are exported too."""
    import itertools
    import folder_paths
    node = EXPORT
    if dtype not in DTYPES:
        raise ValueError(f"{node}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if mode not in ("rank", "energy"):
        raise ValueError(f"{node}: mode must be 'rank' or 'energy', got {mode!r}")
    out_dir = output_dir or folder_paths.get_output_directory()
    checked(node, check_prefix, filename_prefix, out_dir)  # before the minutes of work, not after
    t0 = time.perf_counter()
    deltas = fused_deltas(node, model)
    foreign = foreign_patched_keys(model)
    te_keys, te_unnamed, te_names = [], [], {}
    if clip is not None:
        te_keys, te_unnamed, te_names, te_deltas = clip_deltas(clip)
        deltas = itertools.chain(deltas, te_deltas)
    # The randomized SVDs are the long part: the progress bar advances once per weight.
    n_weights = sum(1 for ps in model.patches.values() if ps) + len(te_keys)
    deltas = ((k, d) for k, d in with_progress(deltas, n_weights) if torch.any(d))
    kw = dict(rank=rank, energy=None, dtype=DTYPES[dtype]) if mode == "rank" else \
        dict(rank=None, energy=energy, max_rank=rank, dtype=DTYPES[dtype])
    kw["lora_names"] = te_names
    from ..lora import export as lora_export
    if method == "full":
        sd, rep = checked(node, lora_export.full_svd_export, deltas, **kw)
    else:
        sd, rep = checked(node, lora_export.export_lora, deltas, seed=seed, **kw)
    folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
    records = fuse_records(model)
    meta = {"fewstep.fuse": json.dumps([r.to_json() for r in records]), "fewstep.export": json.dumps(
        {"mode": mode, "rank": rank, "energy": energy, "seed": seed, "method": rep.method,
         "overall_rel_error": rep.overall_rel_error, "other_patched_weights": len(foreign)})}
    check_room(node, path, sum(t.numel() * t.element_size() for t in sd.values()))
    written(node, path, lambda: checked(node, lora_export.save_lora, path, sd, rep, meta))
    worst = rep.worst(10)
    ranks = [k.rank for k in rep.keys if k.rank]
    lines = [f"{node}: {len(rep.keys)} weights exported ({rep.method} SVD, "
             + (f"rank {rank}" if mode == "rank" else f"energy {energy:g}, rank cap {rank}")
             + f", ranks {min(ranks) if ranks else 0}..{max(ranks) if ranks else 0}) in "
               f"{time.perf_counter() - t0:.2f} s",
             f"overall relative Frobenius error: {rep.overall_rel_error:.4%}",
             f"file: {saved_text(path, out_dir)}",
             "worst keys (relative Frobenius error, rank):"]
    lines += [f"  {k.rel_error:.4%}  r={k.rank}  {k.key}" for k in worst]
    if rep.skipped_zero:
        lines.append(f"zero deltas skipped: {len(rep.skipped_zero)}")
    if foreign:
        lines.append(f"{len(foreign)} weights also carry patches from other nodes (e.g. core LoRA loaders); they are "
                     f"exported as the host applies them, so the file holds the model's whole change (e.g. "
                     f"{foreign[0]})")
    te_in_files = sum(a.te_modules for r in records for a in r.adapters)
    if clip is not None:
        lines.append(f"text encoder: {len(te_keys)} weights exported from the connected clip"
                     + (f"; {len(te_unnamed)} patched clip weights have no kohya LoRA name and are left out "
                        f"(e.g. {te_unnamed[0]})" if te_unnamed else ""))
    elif te_in_files:
        lines.append(f"text encoder: NOT exported -- the fused LoRAs have {te_in_files} text-encoder modules; "
                     f"connect FewStep LoRA Fuse's clip output (with its clip input connected) to include them")
        LOG.warning("%s: %d text-encoder modules of the fused LoRAs are not in the export (no clip connected)",
                    node, te_in_files)
    report = "\n".join(lines)
    LOG.info("%s; overall relative error %.4f%%; %s", lines[0], 100 * rep.overall_rel_error, path)
    LOG.debug("%s", report)
    return path, report


NODES = [FewStepSaveFused, FewStepExportLora]
