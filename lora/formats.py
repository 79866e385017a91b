"""Read a LoRA-family adapter file (``.safetensors`` only) into typed entries.

One algorithm: parse the tensor names of a safetensors file into per-module
entries. Nothing is unpickled: ``.ckpt/.pt/.pth/.bin`` paths are rejected with
a message saying to convert the file to safetensors.

Recognised per-module tensor names (``<m>`` is the module prefix):

* plain LoRA / LoCon:  ``<m>.lora_up.weight`` + ``<m>.lora_down.weight``
  (+ ``<m>.lora_mid.weight`` for LoCon Tucker), PEFT ``<m>.lora_B.weight`` +
  ``<m>.lora_A.weight`` (also ``.lora_B.default.weight``), diffusers
  ``<m>.lora.up.weight`` + ``<m>.lora.down.weight``, old diffusers
  ``<m>_lora.up.weight``, transformers ``<m>.lora_linear_layer.up.weight``,
  Mochi ``<m>.lora_B`` + ``<m>.lora_A``.
* ``<m>.alpha`` (scalar), ``<m>.dora_scale`` (kohya/LyCORIS DoRA magnitude, any adapter).
* PEFT/diffusers DoRA magnitude ``<m>.lora_magnitude_vector`` (also ``.lora_magnitude_vector.weight`` and
  ``.lora_magnitude_vector.default.weight``), LoRA factors only; shape [out] or [1, out, 1, 1] (conv); the
  fuser checks it has ``out`` values along one axis. It is kept as the entry's ``dora_scale`` (shape as stored) with
  ``dora_norm = "peft"``: the fuser normalises by the combined weight W + ΔW per output channel, as PEFT trains
  it (see ``lora.fuse``). A module with both ``dora_scale`` and a magnitude vector is an error. ai-toolkit's DoRA
  ``<m>.magnitude`` ([out], the same per-output-row norm of the combined weight) is read the same way.
* LoHa: ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b`` (+ ``hada_t1, hada_t2``).
* LoKr: ``lokr_w1`` or ``lokr_w1_a/_b``; ``lokr_w2`` or ``lokr_w2_a/_b``
  (+ ``lokr_t2``).
* full diff ``<m>.diff`` and bias diff ``<m>.diff_b``; LyCORIS norm training ``<m>.w_norm`` / ``<m>.b_norm``
  (a diff of the norm layer's weight / bias, as core ComfyUI applies them).
* GLoRA (LyCORIS): ``a1.weight, a2.weight, b1.weight, b2.weight`` (new and old LyCORIS layouts).
* OFT / BOFT (LyCORIS, sd-scripts ``oft_unet_*``): ``oft_blocks`` ([blocks, n, n]; BOFT [stages, blocks, b, b])
  (+ ``rescale``); the module's ``alpha`` is the OFT norm constraint, not a LoRA scale.
* IA3 (LyCORIS): ``<m>.weight`` + ``<m>.on_input`` (a ``.weight`` without ``.on_input`` stays unrecognised).

GLoRA, OFT/BOFT and IA3 deltas depend on the base weight; ``lora.fuse`` computes them against it.

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

LOG = logging.getLogger("fewstep")

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# (suffix, role, style). Matched longest-suffix-first.
_SUFFIXES: list[tuple[str, str, str]] = [
    (".lora_up.weight", "up", "kohya"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_A.weight", "down", "peft"),
    (".lora.up.weight", "up", "diffusers"),
    (".lora.down.weight", "down", "diffusers"),
    ("_lora.up.weight", "up", "diffusers_old"),
    ("_lora.down.weight", "down", "diffusers_old"),
    (".lora_linear_layer.up.weight", "up", "transformers"),
    (".lora_linear_layer.down.weight", "down", "transformers"),
    (".lora_B", "up", "mochi"),
    (".lora_A", "down", "mochi"),
    (".alpha", "alpha", ""),
    (".dora_scale", "dora_scale", ""),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector.default.weight", "magnitude", "peft"),
    (".hada_w1_a", "hada_w1_a", "loha"),
    (".hada_w1_b", "hada_w1_b", "loha"),
    (".hada_w2_a", "hada_w2_a", "loha"),
    (".hada_w2_b", "hada_w2_b", "loha"),
    (".hada_t1", "hada_t1", "loha"),
    (".hada_t2", "hada_t2", "loha"),
    (".lokr_w1", "lokr_w1", "lokr"),
    (".lokr_w1_a", "lokr_w1_a", "lokr"),
    (".lokr_w1_b", "lokr_w1_b", "lokr"),
    (".lokr_w2", "lokr_w2", "lokr"),
    (".lokr_w2_a", "lokr_w2_a", "lokr"),
    (".lokr_w2_b", "lokr_w2_b", "lokr"),
    (".lokr_t2", "lokr_t2", "lokr"),
    (".diff_b", "diff_b", "full"),
    (".diff", "diff", "full"),
    (".w_norm", "w_norm", "full"),
    (".b_norm", "b_norm", "full"),
    (".magnitude", "magnitude", "peft"),  # ai-toolkit DoRA (PEFT convention)
    (".a1.weight", "glora_a1", "glora"),
    (".a2.weight", "glora_a2", "glora"),
    (".b1.weight", "glora_b1", "glora"),
    (".b2.weight", "glora_b2", "glora"),
    (".oft_blocks", "oft_blocks", "oft"),
    (".rescale", "oft_rescale", "oft"),
    (".on_input", "ia3_on_input", "ia3"),
    (".weight", "ia3_weight", "ia3"),  # only with a matching .on_input (see parse_state_dict)
]
_SUFFIXES.sort(key=lambda s: len(s[0]), reverse=True)

DORA_NORM_PEFT = "peft"
"""``ModuleEntry.dora_norm`` of a PEFT/diffusers ``lora_magnitude_vector`` entry (combined-weight norm)."""

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
class ModuleEntry:
    """Common fields of one adapter module (one target weight).

    Attributes:
        name: the module prefix as written in the file (e.g. ``lora_unet_..._to_q``).
        file: path of the file it came from (for error messages).
        alpha: alpha value, or None when the file carried none.
        alpha_source: "tensor", "ss_network_alpha", "ss_network_args.conv_alpha",
            "lora_adapter_metadata", or "rank" (defaulted).
        dora_scale: DoRA magnitude tensor (as stored in the file) or None.
        rslora: PEFT rank-stabilised scaling (scale = alpha / sqrt(rank)); from ``lora_adapter_metadata``.
        dora_norm: how the fuser normalises ``dora_scale``: "" for kohya/LyCORIS ``dora_scale`` (axis from its
            shape, output-axis norm of the base or combined weight per ``dora_mode``); ``DORA_NORM_PEFT``
            ("peft") for a PEFT/diffusers ``lora_magnitude_vector``: always the per-output-channel norm of the
            combined weight W + ΔW, whatever ``dora_mode`` is.
        style: key style ("kohya", "peft", "diffusers", "loha", "lokr", "full", ...).
        source_keys: the tensor names consumed for this entry.
    """

    name: str
    file: str
    alpha: float | None = None
    alpha_source: str = "rank"
    dora_scale: torch.Tensor | None = None
    dora_norm: str = ""
    style: str = ""
    source_keys: list[str] = field(default_factory=list)
    rslora: bool = False

    kind = "base"

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with ``rslora`` (1.0 when alpha or rank is undefined)."""
        r = self.rank
        if r is None or self.alpha is None:
            return 1.0
        return float(self.alpha) / (math.sqrt(r) if self.rslora else float(r))


@dataclass
class LoraModule(ModuleEntry):
    """Plain LoRA / LoCon: ΔW = scale · up @ [mid ∘] down.

    Shapes: linear down [r, in], up [out, r]; conv down [r, in, kh, kw], up [out, r, 1, 1];
    LoCon Tucker: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1].
    """

    down: torch.Tensor = None  # type: ignore[assignment]
    up: torch.Tensor = None  # type: ignore[assignment]
    mid: torch.Tensor | None = None
    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LohaModule(ModuleEntry):
    """LoHa: ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b); Tucker form when t1/t2 given. rank = w1_b.shape[0]."""

    w1_a: torch.Tensor = None  # type: ignore[assignment]
    w1_b: torch.Tensor = None  # type: ignore[assignment]
    w2_a: torch.Tensor = None  # type: ignore[assignment]
    w2_b: torch.Tensor = None  # type: ignore[assignment]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])


@dataclass
class LokrModule(ModuleEntry):
    """LoKr: ΔW = scale · kron(W1, W2). rank = w2_b.shape[0] if W2 is factored, else w1_b.shape[0],
    else undefined (scale 1), as in ComfyUI's LoKrAdapter."""

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "lokr"

    @property
    def rank(self) -> int | None:
        if self.w2 is None and self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1 is None and self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None


@dataclass
class DiffModule(ModuleEntry):
    """Full weight delta (LyCORIS "full"): ΔW = diff."""

    diff: torch.Tensor = None  # type: ignore[assignment]
    kind = "diff"


@dataclass
class BiasDiffModule(ModuleEntry):
    """Bias delta: Δb = diff_b (targets the ``.bias`` of the module)."""

    diff: torch.Tensor = None  # type: ignore[assignment]
    kind = "bias_diff"


@dataclass
class GloraModule(ModuleEntry):
    """GLoRA (LyCORIS): ΔW = scale · (W·A + B), A = a1 @ a2 acting on the input axis, B = b1 @ b2.

    New LyCORIS layout: a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in·k·k] (1×1 convs for a1/a2 on conv layers);
    old layout (LyCORIS < 2): ΔW = scale · ((W_flat @ a2) @ a1 + b2 @ b1) with a1 [r, in], a2 [in, r], b1 [r, in],
    b2 [out, r]. ``lora.fuse`` picks the layout from the shapes (as ComfyUI does). Needs the base weight W.
    """

    a1: torch.Tensor = None  # type: ignore[assignment]
    a2: torch.Tensor = None  # type: ignore[assignment]
    b1: torch.Tensor = None  # type: ignore[assignment]
    b2: torch.Tensor = None  # type: ignore[assignment]
    kind = "glora"

    @property
    def rank(self) -> int:
        new = self.b2.shape[0] == self.b1.shape[1] == self.a1.shape[1] == self.a2.shape[0]
        return int(self.a2.shape[0] if new else self.a1.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank; alpha None or 0 means rank (LyCORIS: no scaling)."""
        if not self.alpha:
            return 1.0
        return float(self.alpha) / float(self.rank)


@dataclass
class OftModule(ModuleEntry):
    """OFT / BOFT (LyCORIS ``diag-oft`` / ``boft``, sd-scripts OFT): W' = rescale ⊙ (R-rotated W).

    ``blocks`` [k, n, n] (OFT: block-diagonal Cayley rotation, W' = Rᵀ W per block of n output rows) or
    [m, k, b, b] (BOFT: m butterfly stages). ``alpha`` is the constraint: the skew part's norm is clamped to
    ``alpha · out_dim`` (0 or None: no clamp). Needs the base weight W.
    """

    blocks: torch.Tensor = None  # type: ignore[assignment]
    rescale: torch.Tensor | None = None

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "boft" if self.blocks.ndim == 4 else "oft"

    @property
    def scale(self) -> float:
        return 1.0


@dataclass
class Ia3Module(ModuleEntry):
    """IA3 (LyCORIS): W' = W ⊙ (1 + w) along the output axis, or the input axis when ``on_input``. Needs W."""

    weight: torch.Tensor = None  # type: ignore[assignment]
    on_input: bool = False
    kind = "ia3"

    @property
    def scale(self) -> float:
        return 1.0


BASE_DEPENDENT = (GloraModule, OftModule, Ia3Module)
"""Entry types whose delta depends on the base weight (besides DoRA entries of any type)."""

Entry = LoraModule | LohaModule | LokrModule | DiffModule | BiasDiffModule | GloraModule | OftModule | Ia3Module


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
    for suffix, role, style in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, style
    return key, "", ""


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
                            if f is not None:
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
    return parse_state_dict(tensors, metadata, path, strict=strict)


def _refuse_non_adapter(path: str, keys: list[str]) -> None:
    """ValueError when no tensor name is an adapter part (a full checkpoint or UNet in the loras folder), from the
    header alone."""
    names = set(keys)
    for k in keys:
        module, role, _ = split_key(k)
        if k.startswith(_EMBEDDING_PREFIXES) or is_text_encoder_module(module):
            return
        if role and (role != "ia3_weight" or f"{module}.on_input" in names):
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
        if not role or (role == "ia3_weight" and f"{module}.on_input" not in tensors):
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
               f"e.g. '{unknown[0]}' (supported: LoRA/LoCon, LoHa, LoKr, GLoRA, OFT/BOFT, IA3, DoRA, full diffs)")
        if strict:
            raise ValueError(msg)
        LOG.warning(msg)
    if te_keys:
        LOG.info("%s: %d text encoder keys (not fused into the UNet)", path, len(te_keys))

    resolver = _AlphaResolver(path, metadata)
    entries: list[Entry] = []
    for module, slot in groups.items():
        entries.extend(_build_entries(path, module, slot, resolver))
    return Adapter(path=path, metadata=metadata, entries=entries, text_encoder_keys=te_keys,
                   unknown_keys=unknown, embedding_keys=embeddings)


def _get(slot: dict, role: str) -> torch.Tensor | None:
    v = slot.get(role)
    return None if v is None else v[1]


def _dora(path: str, module: str, slot: dict, keys: dict[str, str]) -> tuple[torch.Tensor | None, str]:
    """(DoRA magnitude or None, ``dora_norm``) of one module: kohya ``dora_scale`` or PEFT ``lora_magnitude_vector``."""
    if "magnitude" not in slot:
        return _get(slot, "dora_scale"), ""
    if "dora_scale" in slot:
        raise ValueError(f"{path}: module '{module}' has two DoRA magnitudes ('{keys['dora_scale']}' and "
                         f"'{keys['magnitude']}'); the file mixes key styles")
    if "up" not in slot and "down" not in slot:
        raise ValueError(f"{path}: '{keys['magnitude']}' (PEFT DoRA magnitude) has no LoRA up/down factors "
                         f"for module '{module}'")
    return _get(slot, "magnitude"), DORA_NORM_PEFT


def _build_entries(path: str, module: str, slot: dict, resolver: _AlphaResolver) -> list[Entry]:
    used = {role for role in slot}
    keys = {role: v[0] for role, v in slot.items()}
    alpha_t = _get(slot, "alpha")
    alpha: float | None = None
    alpha_source = "rank"
    if alpha_t is not None:
        if alpha_t.numel() != 1:
            raise ValueError(f"{path}: '{keys['alpha']}' must be a scalar, got shape {tuple(alpha_t.shape)}")
        alpha = float(alpha_t.reshape(()).item())
        alpha_source = "tensor"
    dora, dora_norm = _dora(path, module, slot, keys)
    out: list[Entry] = []

    def common(style: str, roles: list[str], kxk: bool) -> dict:
        a, src = alpha, alpha_source
        if a is None:
            a, src = resolver.resolve(module, kxk)
        src_keys = [keys[r] for r in roles if r in keys]
        for r in ("alpha", "dora_scale", "magnitude"):
            if r in keys:
                src_keys.append(keys[r])
        return dict(name=module, file=path, alpha=a, alpha_source=src, dora_scale=dora, dora_norm=dora_norm,
                    style=style, source_keys=src_keys)

    consumed: set[str] = {"alpha", "dora_scale", "magnitude"}
    if "up" in slot or "down" in slot:
        if "up" not in slot or "down" not in slot:
            have = keys.get("up") or keys.get("down")
            raise ValueError(f"{path}: '{have}' has no matching {'down' if 'up' in slot else 'up'} factor; "
                             f"the file is incomplete")
        up, down, mid = _get(slot, "up"), _get(slot, "down"), _get(slot, "mid")
        style = slot["up"][2]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{path}: module '{module}' rank mismatch: up {tuple(up.shape)} vs down "
                             f"{tuple(down.shape)} ('{keys['up']}')")
        kxk = (mid is not None and mid.ndim == 4 and mid.shape[-1] > 1) or (down.ndim == 4 and down.shape[-1] > 1)
        c = common(style, ["up", "down", "mid"], kxk)
        if c["alpha"] is None:
            c["alpha"] = float(down.shape[0])
        c["rslora"] = c["alpha_source"] == "lora_adapter_metadata" and resolver.peft_rslora
        out.append(LoraModule(down=down, up=up, mid=mid, **c))
        consumed |= {"up", "down", "mid"}
    elif any(r.startswith("hada_") for r in slot):
        need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        miss = [r for r in need if r not in slot]
        if miss:
            raise ValueError(f"{path}: LoHa module '{module}' lacks '{module}.{miss[0]}'")
        c = common("loha", need + ["hada_t1", "hada_t2"], _get(slot, "hada_t1") is not None)
        e = LohaModule(w1_a=_get(slot, "hada_w1_a"), w1_b=_get(slot, "hada_w1_b"), w2_a=_get(slot, "hada_w2_a"),
                       w2_b=_get(slot, "hada_w2_b"), t1=_get(slot, "hada_t1"), t2=_get(slot, "hada_t2"), **c)
        if e.alpha is None:
            e.alpha = float(e.rank)
        out.append(e)
        consumed |= set(need) | {"hada_t1", "hada_t2"}
    elif any(r.startswith("lokr_") for r in slot):
        w1_ok = "lokr_w1" in slot or ("lokr_w1_a" in slot and "lokr_w1_b" in slot)
        w2_ok = "lokr_w2" in slot or ("lokr_w2_a" in slot and "lokr_w2_b" in slot)
        if not (w1_ok and w2_ok):
            raise ValueError(f"{path}: LoKr module '{module}' needs lokr_w1 (or lokr_w1_a/_b) and lokr_w2 "
                             f"(or lokr_w2_a/_b)")
        roles = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]
        c = common("lokr", roles, _get(slot, "lokr_t2") is not None)
        e = LokrModule(w1=_get(slot, "lokr_w1"), w1_a=_get(slot, "lokr_w1_a"), w1_b=_get(slot, "lokr_w1_b"),
                       w2=_get(slot, "lokr_w2"), w2_a=_get(slot, "lokr_w2_a"), w2_b=_get(slot, "lokr_w2_b"),
                       t2=_get(slot, "lokr_t2"), **c)
        if e.alpha is None and e.rank is not None:
            e.alpha = float(e.rank)
        out.append(e)
        consumed |= set(roles)
    elif any(r.startswith("glora_") for r in slot):
        need = ["glora_a1", "glora_a2", "glora_b1", "glora_b2"]
        miss = [r for r in need if r not in slot]
        if miss:
            raise ValueError(f"{path}: GLoRA module '{module}' lacks '{module}.{miss[0][6:]}.weight'")
        c = common("glora", need, False)
        out.append(GloraModule(a1=_get(slot, "glora_a1"), a2=_get(slot, "glora_a2"), b1=_get(slot, "glora_b1"),
                               b2=_get(slot, "glora_b2"), **c))
        consumed |= set(need)
    elif "oft_blocks" in slot:
        blocks = _get(slot, "oft_blocks")
        if blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
            raise ValueError(f"{path}: '{keys['oft_blocks']}' has shape {tuple(blocks.shape)}; OFT blocks are "
                             f"[blocks, n, n] and BOFT blocks [stages, blocks, b, b]")
        c = common("oft", ["oft_blocks", "oft_rescale"], False)
        out.append(OftModule(blocks=blocks, rescale=_get(slot, "oft_rescale"), **c))
        consumed |= {"oft_blocks", "oft_rescale"}
    elif "ia3_on_input" in slot:
        if "ia3_weight" not in slot:
            raise ValueError(f"{path}: IA3 module '{module}' lacks '{module}.weight'")
        flag = _get(slot, "ia3_on_input")
        if flag.numel() != 1:
            raise ValueError(f"{path}: '{keys['ia3_on_input']}' must be a scalar, got shape {tuple(flag.shape)}")
        c = common("ia3", ["ia3_weight", "ia3_on_input"], False)
        c["alpha"], c["alpha_source"] = None, "n/a"
        out.append(Ia3Module(weight=_get(slot, "ia3_weight"), on_input=bool(flag.reshape(()).item()), **c))
        consumed |= {"ia3_weight", "ia3_on_input"}
    if dora is not None and any(isinstance(e, BASE_DEPENDENT) for e in out):
        raise ValueError(f"{path}: module '{module}' combines DoRA ('{keys.get('dora_scale') or keys['magnitude']}') "
                         f"with {out[0].kind.upper()}; DoRA is supported on LoRA, LoHa and LoKr modules only")
    for role in ("diff", "w_norm"):  # a whole-weight delta (LyCORIS full / norm training)
        if role not in slot:
            continue
        c = common("full", [role], False)
        c["alpha"], c["alpha_source"] = None, "n/a"
        if out:
            raise ValueError(f"{path}: module '{module}' has both {out[0].kind} weights and '{keys[role]}'")
        out.append(DiffModule(diff=_get(slot, role), **c))
        consumed.add(role)
    for role in ("diff_b", "b_norm"):  # a bias delta
        if role not in slot:
            continue
        if any(isinstance(e, BiasDiffModule) for e in out):
            raise ValueError(f"{path}: module '{module}' has two bias deltas ('{keys['diff_b']}' and "
                             f"'{keys['b_norm']}')")
        out.append(BiasDiffModule(name=module, file=path, alpha=None, alpha_source="n/a", style="full",
                                  source_keys=[keys[role]], diff=_get(slot, role)))
        consumed.add(role)
    leftover = used - consumed
    if not out and set(slot) == {"alpha"}:
        LOG.warning("%s: '%s' has no adapter weights; ignored", path, keys["alpha"])
        return []
    if not out or ("dora_scale" in slot and not any(isinstance(e, (LoraModule, LohaModule, LokrModule)) for e in out)):
        lone = keys.get("alpha") or keys.get("dora_scale") or next(iter(keys.values()))
        raise ValueError(f"{path}: '{lone}' has no adapter weights for module '{module}'")
    if leftover:
        raise ValueError(f"{path}: '{keys[sorted(leftover)[0]]}' does not fit module '{module}' "
                         f"({out[0].kind} adapter)")
    return out
