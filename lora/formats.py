"""Read a LoRA-family adapter file (``.safetensors`` only) into typed entries.

One algorithm: parse the tensor names of a safetensors file into per-module
entries. Nothing is unpickled: ``.ckpt/.pt/.pth/.bin`` paths are rejected with
a message saying to convert the file to safetensors.

Tensor names: ``<m>.<suffix>`` with ``<m>`` the module prefix. Each adapter kind in ``lora.adapters`` lists its
suffixes and parses its part of a module (LoRA/LoCon, LoHa, LoKr, GLoRA, OFT/BOFT, IA3, full diffs, norm); every
kind shares these (``lora.adapters.base.COMMON_SUFFIXES``):

* ``<m>.alpha`` (scalar) and ``<m>.dora_scale`` (kohya/LyCORIS DoRA magnitude, LoRA/LoHa/LoKr).
* PEFT/diffusers DoRA magnitude ``<m>.lora_magnitude_vector`` (also ``.lora_magnitude_vector.weight`` and
  ``.lora_magnitude_vector.default.weight``), LoRA factors only; shape [out] or [1, out, 1, 1] (conv); the
  fuser checks it has ``out`` values along one axis. It is kept as the entry's ``dora_scale`` (shape as stored) with
  ``dora_norm = "peft"``: the fuser normalises by the combined weight W + ΔW per output channel, as PEFT trains
  it (see ``lora.fuse``). A module with both ``dora_scale`` and a magnitude vector is an error. ai-toolkit's DoRA
  ``<m>.magnitude`` ([out], the same per-output-row norm of the combined weight) is read the same way.

Alpha resolution per module, first hit wins: the ``<m>.alpha`` tensor; kohya
header ``ss_network_alpha`` (``conv_alpha`` from ``ss_network_args`` for
k x k convs with k > 1); diffusers header ``lora_adapter_metadata`` JSON
(``alpha_pattern`` then ``lora_alpha``, with or without the ``unet.`` prefix);
else alpha = rank (scale 1). Scale = alpha / rank, or alpha / sqrt(rank) for a
plain LoRA whose alpha comes from a ``lora_adapter_metadata`` with
``use_rslora`` (PEFT's rank-stabilised scaling).

Text-encoder modules (``lora_te*``, ``text_encoder*``, ``text_encoders.*``,
OneTrainer's ``clip_l.*`` / ``clip_g.*``, a PEFT CLIP adapter's
``base_model.model.text_model.*``) are counted and reported as "text encoder
keys (not fused into the UNet)"; they produce no entries. ``te_state_dict``
turns them into the spellings and alpha tensors core ComfyUI's CLIP loader
reads. Bundled textual-inversion embeddings (OneTrainer ``bundle_emb.*``) are
listed apart as ``embedding_keys``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .adapters import ADAPTERS, COMMON_SUFFIXES, Entry, ModuleTensors, Suffix, parse_module

LOG = logging.getLogger("fewstep")

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# The suffixes every kind shares (alpha, DoRA magnitudes) and each registered kind's own (lora.adapters).
_SUFFIXES: list[Suffix] = sorted([*COMMON_SUFFIXES, *(s for kind in ADAPTERS for s in kind.suffixes)],
                                 key=lambda s: len(s.suffix), reverse=True)  # matched longest-suffix-first
SUPPORTED = ", ".join([k.name for k in ADAPTERS] + ["DoRA"])
_NEEDS = {s.role: s.needs for s in _SUFFIXES if s.needs}  # role -> sibling suffix it needs (IA3's bare .weight)

_TE_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_te1_", "lora_te2_", "te1.", "te2.",
                "clip_l.", "clip_g.", "base_model.model.text_model.")
# Spellings core ComfyUI's CLIP key map does not know, and the ones it does (OneTrainer's OMI format names the
# encoders clip_l / clip_g; a PEFT adapter saved from a CLIPTextModel starts at its text_model).
_TE_RENAMES = (("clip_l.", "text_encoders.clip_l.transformer."), ("clip_g.", "text_encoders.clip_g.transformer."))
_PEFT_TE_PREFIX = "base_model.model.text_model."
_EMBEDDING_PREFIXES = ("bundle_emb.",)


def is_text_encoder_module(module: str) -> bool:
    """True when ``module`` names a text-encoder layer (kohya ``lora_te*``, diffusers ``text_encoder*``,
    OneTrainer ``clip_l.``/``clip_g.``, PEFT ``base_model.model.text_model.``)."""
    return module.startswith(_TE_PREFIXES)


@dataclass
class Adapter:
    """Parsed adapter file.

    Attributes:
        path: file path.
        metadata: safetensors ``__metadata__`` (str -> str).
        entries: UNet-side module entries (one module may give a weight entry and a bias entry).
        text_encoder_keys: tensor names belonging to text-encoder modules (not fused into the UNet).
        unknown_keys: tensor names that match no known suffix (e.g. old LyCORIS ``oft_diag``), left unused.
        embedding_keys: bundled textual-inversion embeddings (OneTrainer ``bundle_emb.*``), not a LoRA part.
    """

    path: str
    metadata: dict[str, str]
    entries: list[Entry]
    text_encoder_keys: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)
    embedding_keys: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def modules(self) -> list[str]:
        """Distinct module names of the UNet entries, in file order."""
        seen: dict[str, None] = {}
        for e in self.entries:
            seen.setdefault(e.name, None)
        return list(seen)

    def summary(self) -> str:
        """One-line human summary (entry kinds, TE keys, unknown keys)."""
        kinds: dict[str, int] = {}
        for e in self.entries:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        parts = [f"{self.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))]
        if self.text_encoder_keys:
            parts.append(f"{len(self.text_encoder_keys)} text encoder keys (not fused into the UNet)")
        if self.unknown_keys:
            parts.append(f"{len(self.unknown_keys)} unrecognised keys (e.g. {self.unknown_keys[0]})")
        if self.embedding_keys:
            parts.append(f"{len(self.embedding_keys)} bundled embedding tensors (not a LoRA part)")
        return "; ".join(parts)


def split_key(key: str) -> tuple[str, str, str]:
    """Split a tensor name into (module prefix, role, style); role "" when the suffix is unknown."""
    for s in _SUFFIXES:
        if key.endswith(s.suffix) and len(key) > len(s.suffix):
            return key[: -len(s.suffix)] + s.module_tail, s.role, s.style
    return key, "", ""


def _is_part(module: str, role: str, names) -> bool:
    """``role`` names an adapter part of ``module`` (a role that needs a sibling, IA3's ``.weight``, only with it)."""
    return bool(role) and (role not in _NEEDS or module + _NEEDS[role] in names)


def te_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> dict[str, torch.Tensor]:
    """An adapter's text-encoder tensors as core ComfyUI's CLIP LoRA loader reads them.

    * OneTrainer ``clip_l.*`` / ``clip_g.*`` become ``text_encoders.clip_l.transformer.*`` / ``…clip_g…``, and a PEFT
      CLIP adapter's ``base_model.model.text_model.*`` becomes ``text_encoder.text_model.*`` (``text_encoder_2.`` when
      its attention is 1280 wide: SDXL's CLIP-G): spellings the host's CLIP key map knows.
    * A LoRA module whose alpha only the header gives (kohya ``ss_network_alpha``; diffusers
      ``lora_adapter_metadata`` under ``text_encoder.`` / ``text_encoder_2.``, ``alpha_pattern`` and ``use_rslora``
      included) gets an ``<m>.alpha`` tensor, so the host scales it as the UNet side is scaled; core reads only
      ``.alpha`` tensors.
    """
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m, role, _ = split_key(k)
        mods.setdefault(m, {})[role] = t
    width = next((int(r["down"].shape[-1]) for m, r in mods.items() if ".self_attn." in m and "down" in r), None)
    peft_target = "text_encoder_2.text_model." if width == 1280 else "text_encoder.text_model."

    def rename(m: str) -> str:
        for old, new in _TE_RENAMES:
            if m.startswith(old):
                return new + m[len(old):]
        return peft_target + m[len(_PEFT_TE_PREFIX):] if m.startswith(_PEFT_TE_PREFIX) else m

    out = {}
    for k, t in tensors.items():
        m = split_key(k)[0]
        out[rename(m) + k[len(m):]] = t
    resolvers: dict[str, _AlphaResolver] = {}
    for m, roles in mods.items():
        if "alpha" in roles or "down" not in roles or "up" not in roles:
            continue
        hm = rename(m)
        part = "text_encoder_2." if hm.startswith("text_encoder_2.") else "text_encoder."
        res = resolvers.setdefault(part, _AlphaResolver(path, metadata, part))
        alpha, src = res.resolve(hm, False)
        if alpha is None:
            continue
        rank = int(roles["down"].shape[0])
        if src == "lora_adapter_metadata" and res.peft_rslora:
            alpha = alpha * rank / math.sqrt(rank)  # the host divides by rank: alpha / sqrt(rank) overall
        out[hm + ".alpha"] = torch.tensor(float(alpha))
    return out


def check_finite(path: str, key: str, t: torch.Tensor) -> None:
    """ValueError naming the file and tensor when ``t`` holds NaN or Inf."""
    # min and max propagate NaN, and +/-Inf shows in one of them: one cheap reduction pass, no overflow risk
    # (a float64 sum is ~25x slower on CPU half tensors; isfinite().all() slower still).
    if not t.is_floating_point() or t.numel() == 0:
        return
    try:
        lo, hi = torch.aminmax(t)
    except RuntimeError:  # a dtype without an aminmax kernel (e.g. fp8): widen first
        lo, hi = torch.aminmax(t.to(torch.float32))
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{path}: tensor '{key}' contains NaN or Inf values; the adapter file is damaged, "
                         f"re-download or re-export it")


def _parse_float(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _valid_pattern(path: str, pattern: str) -> bool:
    """An ``alpha_pattern`` key is a regular expression (PEFT matches module names with it); a broken one is
    logged and ignored, like the header's other unreadable fields."""
    try:
        re.compile(pattern)
        return True
    except re.error as e:
        LOG.warning("%s: lora_adapter_metadata alpha_pattern %r is not a regular expression (%s); ignored", path,
                    pattern[:60], e)
        return False


class _AlphaResolver:
    """Alpha from header metadata when a module has no ``.alpha`` tensor.

    ``part`` is the diffusers ``lora_adapter_metadata`` prefix of the model part the modules belong to:
    "unet." (also read without a prefix), "text_encoder." or "text_encoder_2."."""

    def __init__(self, path: str, metadata: dict[str, str], part: str = "unet."):
        self.path = path
        self.part = part
        self.ss_alpha = _parse_float(metadata.get("ss_network_alpha"))
        self.ss_conv_alpha: float | None = None
        args = metadata.get("ss_network_args")
        if args:
            try:
                parsed = json.loads(args)
                if isinstance(parsed, dict):
                    self.ss_conv_alpha = _parse_float(parsed.get("conv_alpha"))
            except (ValueError, TypeError):
                LOG.warning("%s: header ss_network_args is not JSON; ignored", path)
        self.peft_alpha: float | None = None
        self.peft_pattern: dict[str, float] = {}
        self.peft_rslora = False
        raw = metadata.get("lora_adapter_metadata")
        if raw:
            try:
                cfg = json.loads(raw)
            except ValueError:
                LOG.warning("%s: header lora_adapter_metadata is not JSON; ignored", path)
                cfg = {}
            if isinstance(cfg, dict):
                for prefix in ((part, "") if part == "unet." else (part,)):
                    if self.peft_alpha is None:
                        self.peft_alpha = _parse_float(cfg.get(prefix + "lora_alpha"))
                        self.peft_rslora = cfg.get(prefix + "use_rslora") in (True, "true", "True")
                    pat = cfg.get(prefix + "alpha_pattern")
                    if isinstance(pat, dict):
                        for k, v in pat.items():
                            f = _parse_float(v)
                            if f is not None and _valid_pattern(path, str(k)):
                                self.peft_pattern.setdefault(str(k), f)

    def resolve(self, module: str, is_conv_kxk: bool) -> tuple[float | None, str]:
        """(alpha or None, its source) for ``module``; the source "lora_adapter_metadata" implies
        ``self.peft_rslora`` applies."""
        if self.ss_alpha is not None or self.ss_conv_alpha is not None:
            if is_conv_kxk and self.ss_conv_alpha is not None:
                return self.ss_conv_alpha, "ss_network_args.conv_alpha"
            if self.ss_alpha is not None:
                return self.ss_alpha, "ss_network_alpha"
        if self.peft_pattern or self.peft_alpha is not None:
            dotted = module
            for p in (self.part, "base_model.model."):
                if dotted.startswith(p):
                    dotted = dotted[len(p):]
            for pat, val in self.peft_pattern.items():
                if dotted == pat or re.fullmatch(rf"(.*\.)?{pat}", dotted):
                    return val, "lora_adapter_metadata"
            if self.peft_alpha is not None:
                return self.peft_alpha, "lora_adapter_metadata"
        return None, "rank"


def read_adapter(path: str | os.PathLike, strict: bool = False) -> Adapter:
    """Read a ``.safetensors`` LoRA/LoCon/LoHa/LoKr/GLoRA/OFT/BOFT/IA3/DoRA/full-diff file.

    Args:
        path: file path; must end in ``.safetensors``.
        strict: raise on unrecognised tensor names instead of logging them.

    Returns:
        Adapter with typed UNet entries, TE key list and unknown key list.

    Raises:
        ValueError: pickle-format path, missing/truncated/corrupt file, NaN/Inf tensor,
            incomplete factor pair, non-scalar alpha, DoRA magnitude without LoRA factors or given twice
            (message names the file and key).
    """
    path = os.fspath(path)
    low = path.lower()
    if low.endswith(PICKLE_EXTENSIONS):
        raise ValueError(f"{path}: pickle-based checkpoints are not loaded (unpickling can run code); "
                         f"convert this file to .safetensors first")
    if not low.endswith(".safetensors"):
        raise ValueError(f"{path}: only .safetensors adapter files are supported")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: adapter file not found")
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover
        raise ValueError(f"{path}: the 'safetensors' package is required to read adapters") from e

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            _refuse_non_adapter(path, keys)  # before reading gigabytes of a checkpoint put in the loras folder
            for k in keys:
                tensors[k] = f.get_tensor(k)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError for truncation
        raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt: {e})") from e
    try:
        return parse_state_dict(tensors, metadata, path, strict=strict)
    except (IndexError, TypeError, OverflowError) as e:  # a tensor shape or dtype no adapter kind expects
        raise ValueError(f"{path}: malformed adapter tensors ({type(e).__name__}: {e})") from None


def _refuse_non_adapter(path: str, keys: list[str]) -> None:
    """ValueError when no tensor name is an adapter part (a full checkpoint or UNet in the loras folder), from the
    header alone."""
    names = set(keys)
    for k in keys:
        module, role, _ = split_key(k)
        if k.startswith(_EMBEDDING_PREFIXES) or is_text_encoder_module(module):
            return
        if _is_part(module, role, names):
            return
    if keys:
        raise ValueError(f"{path}: none of its {len(keys)} tensors is a LoRA/LyCORIS part (e.g. '{keys[0]}'); it "
                         f"looks like a full checkpoint or UNet: load it with a checkpoint/UNet loader instead")


def parse_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str,
                     strict: bool = False) -> Adapter:
    """Group an in-memory adapter state dict into typed entries (see ``read_adapter``)."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor, str]]] = {}
    te_keys: list[str] = []
    unknown: list[str] = []
    embeddings: list[str] = []
    for key, t in tensors.items():
        module, role, style = split_key(key)
        if key.startswith(_EMBEDDING_PREFIXES):
            embeddings.append(key)
            continue
        if is_text_encoder_module(module):
            te_keys.append(key)
            continue
        if not _is_part(module, role, tensors):
            unknown.append(key)
            continue
        check_finite(path, key, t)
        slot = groups.setdefault(module, {})
        if role in slot:
            raise ValueError(f"{path}: module '{module}' has two tensors for '{role}' "
                             f"('{slot[role][0]}' and '{key}'); the file mixes key styles")
        slot[role] = (key, t, style)

    if unknown:
        msg = (f"{path}: {len(unknown)} tensor(s) of unknown adapter type are not used, "
               f"e.g. '{unknown[0]}' (supported: {SUPPORTED})")
        if strict:
            raise ValueError(msg)
        LOG.warning(msg)
    if te_keys:
        LOG.debug("%s: %d text encoder keys (not fused into the UNet)", path, len(te_keys))

    resolver = _AlphaResolver(path, metadata)
    entries: list[Entry] = []
    for module, slot in groups.items():
        entries.extend(parse_module(ModuleTensors(path, module, slot, resolver.resolve, resolver.peft_rslora)))
    return Adapter(path=path, metadata=metadata, entries=entries, text_encoder_keys=te_keys,
                   unknown_keys=unknown, embedding_keys=embeddings)
