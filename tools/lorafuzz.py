"""Fuzzing the LoRA reader and the fuse with hypothesis: seed adapter files of every kind for a small SD1.5-layout
host model, mutations at four levels, and one case run end to end with its outcome classified.

A case is (seed adapter, tensor mutations, header-metadata mutations, safetensors-header mutations, byte mutations,
fuse options). ``run_case`` writes the mutated file into a loras folder and runs what FewStep LoRA Fuse runs on it:
``lora.formats.read_adapter`` (read, parse), the node's key mapping, shape checks and plan, then the host patches the
model (each weight's delta computed) and unpatches it. Outcomes:

* ``ok``: fused; every patched weight finite; the model's weights bit-exact after unpatching;
* ``clear``: a ValueError/OSError whose message names the file;
* ``unclear``: a ValueError/OSError that does not name the file;
* ``crash``: any other exception type escaping (a library's own error, a TypeError, ...);
* ``left_patched``: a weight differs from its original after unpatching;
* ``non_finite``: fused without an error into NaN/Inf weights (a silent bad result).

Used by ``tests/host/test_lora_fuzz_host.py`` (a fast sample) and ``bench/bench_lora_fuzz.py`` (the soak).
"""
from __future__ import annotations

import json
import math
import os
import random
import struct
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

OUTCOMES = ("ok", "clear", "unclear", "crash", "left_patched", "non_finite")
FAILURES = ("unclear", "crash", "left_patched", "non_finite")

# Module names (kohya) of the small model this harness builds, by role: (name, host weight key).
TARGETS = {
    "linear": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "cross": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "conv": "input_blocks.1.0.in_layers.2",
    "conv1x1": "input_blocks.1.1.proj_in",
    "ff": "middle_block.1.transformer_blocks.0.ff.net.2",
    "norm": "input_blocks.1.1.transformer_blocks.0.norm1",
    "wide": "output_blocks.0.0.in_layers.2",
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int64,
          torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
HEADER_DTYPES = ("F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "U64",
                 "C64", "f16", "", "F4", "NaN", 7, None)
SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_B.weight", ".lora_A.weight",
            ".lora_B.default.weight", ".lora.up.weight", ".lora.down.weight", "_lora.up.weight", ".lora_B", ".lora_A",
            ".alpha", ".dora_scale", ".lora_magnitude_vector", ".magnitude", ".hada_w1_a", ".hada_w1_b",
            ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2",
            ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight",
            ".oft_blocks", ".rescale", ".on_input", ".weight", ".diff", ".diff_b", ".w_norm", ".b_norm", ".bias", "")
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 1e-30, 65504.0, 70000.0, 3.4e38)


# ---------------------------------------------------------------- the small host model

def tiny_model(dtype=torch.float16):
    """A small UNet with the SD1.5 layout (context 768, so the pack takes it for SD1.5) in a real host BaseModel and
    ModelPatcher, seeded weights in ``dtype``."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    from tools.standins import TINY_UNET_CONFIG
    cfg = sm.SD15(dict(TINY_UNET_CONFIG, context_dim=768))
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def snapshot(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def model_bytes(patcher) -> torch.Tensor:
    """Every weight and buffer of the model as one byte vector (one comparison checks them all bit for bit)."""
    return torch.cat([v.detach().reshape(-1).view(torch.uint8) for v in patcher.model.state_dict().values()])


def weight_shapes(patcher) -> dict[str, tuple[int, ...]]:
    sd = patcher.model.state_dict()
    return {role: tuple(sd[f"diffusion_model.{m}.weight"].shape) for role, m in TARGETS.items()}


# ---------------------------------------------------------------- seed adapters (one per kind and key style)

def _kohya(role: str) -> str:
    return "lora_unet_" + TARGETS[role].replace(".", "_")


def _peft(role: str) -> str:
    return "diffusion_model." + TARGETS[role]


SEED_NAMES = ("boft", "diffusers", "full", "glora", "ia3", "kohya", "kohya_dora", "locon_tucker", "loha", "lokr",
              "norm", "oft", "peft_dora")


def seed_adapters(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """name -> (tensors, metadata): valid files of every adapter kind and key style, fitting the small model."""
    g = torch.Generator().manual_seed(1)

    def r(*shape, s=0.05):
        return (torch.randn(shape, generator=g) * s).to(torch.float16)
    lin, cross, conv, c1, ff, norm = (shapes[k] for k in ("linear", "cross", "conv", "conv1x1", "ff", "norm"))
    rk = 4
    out: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    k = _kohya
    out["kohya"] = ({f"{k('linear')}.lora_down.weight": r(rk, lin[1]), f"{k('linear')}.lora_up.weight": r(lin[0], rk),
                     f"{k('linear')}.alpha": torch.tensor(2.0),
                     f"{k('cross')}.lora_down.weight": r(rk, cross[1]), f"{k('cross')}.lora_up.weight": r(cross[0], rk),
                     f"{k('conv')}.lora_down.weight": r(rk, conv[1], 3, 3),
                     f"{k('conv')}.lora_up.weight": r(conv[0], rk, 1, 1),
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(rk, 768),
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(768, rk)},
                    {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_network_args": '{"conv_alpha": 1}'})
    out["locon_tucker"] = ({f"{k('conv')}.lora_down.weight": r(rk, conv[1], 1, 1),
                            f"{k('conv')}.lora_mid.weight": r(rk, rk, 3, 3),
                            f"{k('conv')}.lora_up.weight": r(conv[0], rk, 1, 1), f"{k('conv')}.alpha": torch.tensor(4.0)},
                           {})
    p = _peft
    out["peft_dora"] = ({f"{p('linear')}.lora_A.weight": r(rk, lin[1]), f"{p('linear')}.lora_B.weight": r(lin[0], rk),
                         f"{p('linear')}.lora_magnitude_vector": (torch.rand(lin[0], generator=g) + 0.5).half(),
                         f"{p('ff')}.lora_A.weight": r(rk, ff[1]), f"{p('ff')}.lora_B.weight": r(ff[0], rk)},
                        {"lora_adapter_metadata": json.dumps({"r": rk, "lora_alpha": 8, "use_rslora": True,
                                                              "alpha_pattern": {"attn1.to_q": 2}})})
    out["diffusers"] = ({f"unet.{TARGETS['linear']}.lora.down.weight": r(rk, lin[1]),
                         f"unet.{TARGETS['linear']}.lora.up.weight": r(lin[0], rk)}, {})
    out["kohya_dora"] = ({f"{k('linear')}.lora_down.weight": r(rk, lin[1]), f"{k('linear')}.lora_up.weight": r(lin[0], rk),
                          f"{k('linear')}.dora_scale": (torch.rand(lin[0], 1, generator=g) + 0.5).half()}, {})
    out["loha"] = ({f"{k('linear')}.hada_w1_a": r(lin[0], rk), f"{k('linear')}.hada_w1_b": r(rk, lin[1]),
                    f"{k('linear')}.hada_w2_a": r(lin[0], rk, s=0.5), f"{k('linear')}.hada_w2_b": r(rk, lin[1]),
                    f"{k('linear')}.alpha": torch.tensor(4.0),
                    f"{k('conv')}.hada_w1_a": r(rk, conv[0]), f"{k('conv')}.hada_w1_b": r(rk, conv[1]),
                    f"{k('conv')}.hada_w2_a": r(rk, conv[0]), f"{k('conv')}.hada_w2_b": r(rk, conv[1]),
                    f"{k('conv')}.hada_t1": r(rk, rk, 3, 3), f"{k('conv')}.hada_t2": r(rk, rk, 3, 3)}, {})
    out["lokr"] = ({f"{k('linear')}.lokr_w1": r(4, 4, s=0.3), f"{k('linear')}.lokr_w2_a": r(lin[0] // 4, rk),
                    f"{k('linear')}.lokr_w2_b": r(rk, lin[1] // 4), f"{k('linear')}.alpha": torch.tensor(4.0),
                    f"{k('conv')}.lokr_w1": r(4, 4, s=0.3), f"{k('conv')}.lokr_w2_a": r(rk, conv[0] // 4),
                    f"{k('conv')}.lokr_w2_b": r(rk, conv[1] // 4), f"{k('conv')}.lokr_t2": r(rk, rk, 3, 3)}, {})
    out["glora"] = ({f"{k('linear')}.a1.weight": r(lin[1], rk), f"{k('linear')}.a2.weight": r(rk, lin[1]),
                     f"{k('linear')}.b1.weight": r(lin[0], rk), f"{k('linear')}.b2.weight": r(rk, lin[1]),
                     f"{k('linear')}.alpha": torch.tensor(4.0)}, {})
    out["oft"] = ({f"{k('linear')}.oft_blocks": r(4, lin[0] // 4, lin[0] // 4, s=0.01),
                   f"{k('linear')}.alpha": torch.tensor(1e-3), f"{k('ff')}.oft_blocks": r(2, ff[0] // 2, ff[0] // 2),
                   f"{k('ff')}.rescale": (torch.rand(ff[0], 1, generator=g) + 0.5).half()}, {})
    out["boft"] = ({f"{k('linear')}.oft_blocks": r(2, lin[0] // 4, 4, 4, s=0.01), f"{k('linear')}.alpha": torch.tensor(0.0)},
                   {})
    out["ia3"] = ({f"{k('linear')}.weight": r(lin[0]), f"{k('linear')}.on_input": torch.tensor(0),
                   f"{k('ff')}.weight": r(ff[1]), f"{k('ff')}.on_input": torch.tensor(1)}, {})
    out["full"] = ({f"{k('linear')}.diff": r(*lin, s=0.01), f"{k('conv1x1')}.diff": r(*c1, s=0.01),
                    f"{k('conv1x1')}.diff_b": r(c1[0], s=0.01)}, {})
    out["norm"] = ({f"{k('norm')}.w_norm": r(*norm, s=0.01), f"{k('norm')}.b_norm": r(*norm, s=0.01),
                    "bundle_emb.fewstep.string_to_param.*": r(2, 768)}, {})
    assert tuple(sorted(out)) == SEED_NAMES
    return out


# ---------------------------------------------------------------- mutations

def _rand_shape(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.choice((0, 1, 2, 3, 4, 7, 8, 32, 33, 64)) for _ in range(rng.choice((0, 1, 2, 3, 4, 5))))


def _poison(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    if t.numel() == 0 or not t.is_floating_point():
        return t
    t = t.clone().reshape(-1)
    for _ in range(rng.randint(1, 3)):
        t[rng.randrange(t.numel())] = rng.choice(SPECIAL_FLOATS)
    return t.reshape(t.shape)


def mutate_tensors(sd: dict[str, torch.Tensor], op: str, seed: int) -> dict[str, torch.Tensor]:
    """One tensor-level mutation of a state dict (a new dict)."""
    rng = random.Random(seed)
    sd = dict(sd)
    names = sorted(sd)
    if not names:
        return sd
    key = rng.choice(names)
    suffix = next((s for s in SUFFIXES if s and key.endswith(s)), "")
    module = key[: len(key) - len(suffix)]
    if op == "drop":
        del sd[key]
    elif op == "rename_suffix":
        t = sd.pop(key)
        sd[module + rng.choice(SUFFIXES)] = t
    elif op == "duplicate_style":
        sd[module + rng.choice(SUFFIXES)] = sd[key].clone()
    elif op == "reshape":
        shape = _rand_shape(rng)
        sd[key] = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(sd[key].dtype) \
            if sd[key].is_floating_point() else torch.zeros(shape, dtype=sd[key].dtype)
    elif op == "transpose" and sd[key].ndim >= 2:
        sd[key] = sd[key].transpose(0, 1).contiguous()
    elif op == "dtype":
        sd[key] = sd[key].to(rng.choice(DTYPES))
    elif op == "poison":
        sd[key] = _poison(sd[key], rng)
    elif op == "scale":
        if sd[key].is_floating_point():
            sd[key] = (sd[key].double() * rng.choice((1e4, 1e8, -1e6, 1e-8, 0.0))).to(sd[key].dtype)
    elif op == "alpha":
        value = rng.choice(SPECIAL_FLOATS + (-1.0, 1.0, 4.0))
        shape = rng.choice(((), (), (1,), (2,), (1, 1)))
        sd[module + ".alpha"] = torch.full(shape, value).to(rng.choice((torch.float32, torch.float16, torch.int64)))
    elif op == "te_key":
        sd[rng.choice(("lora_te_", "lora_te1_", "text_encoder.", "clip_l.", "base_model.model.text_model."))
           + "encoder_layers_0_mlp_fc1" + rng.choice(SUFFIXES)] = sd[key].clone()
    elif op == "junk_module":
        sd[rng.choice(("lora_unet_nope", "x", "diffusion_model.input_blocks.99.0", "", ".", "lora_unet_"
                       + "a" * 300)) + rng.choice(SUFFIXES)] = sd[key].clone()
    elif op == "empty":
        sd[key] = torch.empty((0,) + tuple(sd[key].shape[1:]), dtype=sd[key].dtype)
    return sd


TENSOR_OPS = ("drop", "rename_suffix", "duplicate_style", "reshape", "transpose", "dtype", "poison", "scale", "alpha",
              "te_key", "junk_module", "empty")


def mutate_metadata(meta: dict[str, str], op: str, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    meta = dict(meta)
    weird = rng.choice(("nan", "inf", "-inf", "1e999", "-0", "0", "abc", "", "1e-320", "[1]", "{}", "null", "4",
                        "\u00e9\u0000", "9" * 400))
    if op == "ss_alpha":
        meta["ss_network_alpha"] = weird
    elif op == "ss_args":
        meta["ss_network_args"] = rng.choice(('{"conv_alpha": "' + weird + '"}', weird, "[1, 2]",
                                              '{"conv_alpha": ' + rng.choice(("1e400", "NaN", "-Infinity", "null",
                                                                              "[]")) + "}"))
    elif op == "peft":
        pattern = rng.choice(("attn1.to_q", "(", "[", "*", "a{99999999}", ".*", "to_q|", "\\", "(?P<x>", "to_q$"))
        cfg = rng.choice(({"lora_alpha": weird}, {"alpha_pattern": {pattern: rng.choice((1, "x", None, 1e400,
                                                                                         [1]))}},
                          {"lora_alpha": 8, "use_rslora": weird}, [1, 2], "str", {"unet.lora_alpha": -8},
                          {"alpha_pattern": [pattern]}))
        try:
            meta["lora_adapter_metadata"] = json.dumps(cfg)
        except (TypeError, ValueError):
            meta["lora_adapter_metadata"] = weird
    elif op == "raw":
        meta["lora_adapter_metadata"] = weird
    elif op == "huge":
        meta["ss_tag_frequency"] = "x" * rng.choice((10, 100_000, 2_000_000))
    return meta


META_OPS = ("ss_alpha", "ss_args", "peft", "raw", "huge")


def encode(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in sd.items()}, metadata=meta or None)


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | str | bytes, body: bytes, pad: bool = True) -> bytes:
    raw = header if isinstance(header, bytes) else (
        header.encode("utf-8", "surrogatepass") if isinstance(header, str) else json.dumps(header).encode())
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_header(data: bytes, op: str, seed: int) -> bytes:
    """One mutation of the safetensors JSON header (dtype, shape, data_offsets, fields, keys, metadata)."""
    rng = random.Random(seed)
    try:
        header, body = split(data)
    except ValueError:  # an earlier mutation broke the header already (struct.error is a ValueError too)
        return data
    if not isinstance(header, dict):
        return data
    names = sorted(k for k in header if k != "__metadata__")
    if not names:
        return data
    key = rng.choice(names)
    info = header[key]
    if not isinstance(info, dict):
        return data
    if op == "dtype":
        info["dtype"] = rng.choice(HEADER_DTYPES)
    elif op == "shape":
        info["shape"] = rng.choice(([-1, 4], [2 ** 40, 2 ** 40], [], [0], ["4"], [4.5], None, [[4]], [2 ** 63, 2],
                                    [4, 4, 4, 4, 4], [1] * 9, [3]))
    elif op == "offsets" and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(x, int) for x in info["data_offsets"]):
        a, b = info["data_offsets"]
        info["data_offsets"] = rng.choice(([b, a], [a, b + 2], [a - 2, b], [a + 1, b + 1], [0, b], [a, a], [-8, b],
                                           [a, 2 ** 64 - 1], [a], ["0", b], None, [a, len(body) + 4]))
    elif op == "drop_field":
        info.pop(rng.choice(("dtype", "shape", "data_offsets")), None)
    elif op == "extra_field":
        info[rng.choice(("dtype2", "", "shape"))] = rng.choice(([1], "F16", None))
    elif op == "metadata":
        header["__metadata__"] = rng.choice(([1], "x", {"a": 1}, {"a": None}, {"a": {"b": "c"}}, None,
                                             {"ss_network_alpha": 2}))
    elif op == "rename":
        header[rng.choice(("", " ", key + "\u0000", key.upper(), "\ud800x", "é" * 10, key + "/.."))] = header.pop(key)
    elif op == "duplicate_key":  # raw JSON text with a key twice (json.dumps cannot write that)
        text = json.dumps(header)
        dup = json.dumps({key: info})[1:-1]
        return join(text[:-1] + ", " + dup + "}", body)
    elif op == "non_utf8_key":
        raw = json.dumps(header).encode()
        raw = raw.replace(json.dumps(key).encode(), b'"' + key.encode()[:3] + b"\xff\xfe\x80" + b'"', 1)
        return join(raw, body)
    elif op == "not_json":
        return join(rng.choice((b"{", b"[]", b"null", b"\x00" * 16, b'{"a": 1}', b"{}")), body)
    return join(header, body, pad=rng.random() < 0.8)


HEADER_OPS = ("dtype", "shape", "offsets", "drop_field", "extra_field", "metadata", "rename", "duplicate_key",
              "non_utf8_key", "not_json")


def mutate_bytes(data: bytes, op: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if len(data) < 9:
        return data
    if op == "truncate":
        return data[: rng.randrange(0, len(data))]
    if op == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == "flip_body":
        n = min(struct.unpack("<Q", data[:8])[0], len(data))
        b = bytearray(data)
        if len(b) > 8 + n:
            for _ in range(rng.randint(1, 64)):
                b[rng.randrange(8 + n, len(b))] = rng.choice((0xFF, 0x7F, 0x7C, 0x00, 0x80))
        return bytes(b)
    if op == "header_len":
        return struct.pack("<Q", rng.choice((0, 1, 7, len(data), len(data) - 8, 2 ** 63, 2 ** 64 - 1, 100_000_000))) \
            + data[8:]
    if op == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if op == "empty":
        return b""
    return data


BYTE_OPS = ("truncate", "flip", "flip_body", "header_len", "append", "empty")


@dataclass
class Case:
    seed_name: str
    tensor_ops: list[tuple[str, int]] = field(default_factory=list)
    meta_ops: list[tuple[str, int]] = field(default_factory=list)
    header_ops: list[tuple[str, int]] = field(default_factory=list)
    byte_ops: list[tuple[str, int]] = field(default_factory=list)
    role: str = "accel"  # the file as the acceleration LoRA, or as a style LoRA merged with merge_mode
    strength: float = 1.0
    merge_mode: str = "linear"

    def build(self, seeds) -> bytes:
        sd, meta = seeds[self.seed_name]
        for op, s in self.tensor_ops:
            sd = mutate_tensors(sd, op, s)
        for op, s in self.meta_ops:
            meta = mutate_metadata(meta, op, s)
        data = encode(sd, meta)
        for op, s in self.header_ops:
            data = mutate_header(data, op, s)
        for op, s in self.byte_ops:
            data = mutate_bytes(data, op, s)
        return data


FOCUS = ("tensors", "tensors", "tensors", "metadata", "header", "bytes", "mixed")
"""Which mutation levels a case uses (one level mostly, so most cases get past the reader to the fuse and the patch;
"mixed" uses all four)."""


def case_strategy(seed_names=SEED_NAMES):
    """A hypothesis strategy of ``Case``s over the seed adapters' names."""
    from hypothesis import strategies as st

    def ops(names, n):
        return st.lists(st.tuples(st.sampled_from(names), st.integers(0, 2 ** 32 - 1)), min_size=1, max_size=n)

    @st.composite
    def cases(draw):
        focus = draw(st.sampled_from(FOCUS))

        def level(name, names, n):
            return draw(ops(names, n)) if focus in (name, "mixed") else []
        return Case(seed_name=draw(st.sampled_from(sorted(seed_names))), tensor_ops=level("tensors", TENSOR_OPS, 3),
                    meta_ops=level("metadata", META_OPS, 2), header_ops=level("header", HEADER_OPS, 2),
                    byte_ops=level("bytes", BYTE_OPS, 1), role=draw(st.sampled_from(("accel", "style"))),
                    strength=draw(st.sampled_from((1.0, 0.5, -2.0, 10.0))),
                    merge_mode=draw(st.sampled_from(("linear", "ties", "dare", "dare_ties"))))
    return cases()


# ---------------------------------------------------------------- running a case

@dataclass
class Result:
    outcome: str
    detail: str = ""
    stage: str = ""  # where it ended: "read", "fuse" (key mapping, shape checks, plan) or "patch" (the deltas)
    patched: int = 0  # weights the fuse patched (outcome "ok")
    changed: int = 0  # of which changed by the patch


def _names_file(msg: str, path: Path) -> bool:
    return path.name in msg


def run_case(case: Case, seeds, patcher, original: dict[str, torch.Tensor], original_bytes: torch.Tensor, loras: Path,
             index: int) -> Result:
    """Write the case's file to ``loras`` and fuse it into a clone of ``patcher`` as FewStep LoRA Fuse does; then
    patch, unpatch and compare the model with ``original``."""
    from fewstep.lora import formats
    from fewstep.nodes import lora as lora_nodes
    data = case.build(seeds)
    path = loras / f"fuzz-{index:06d}.safetensors"
    path.write_bytes(data)
    stage = "read"
    m = None
    try:
        formats.read_adapter(str(path))
        stage = "fuse"
        styles = [(path.name, case.strength, "")] if case.role == "style" else []
        accel = path.name if case.role == "accel" else "none"
        m, _report, _preset = lora_nodes.fuse(patcher, accel, case.strength, styles, merge_mode=case.merge_mode)
        stage = "patch"
        m.patch_model()
        bad = [k for k in m.patches if not bool(torch.isfinite(_weight(m, k)).all())]
        changed = sum(not torch.equal(_weight(m, k), original[k]) for k in m.patches)
        result = (Result("non_finite", f"{len(bad)} weights not finite, e.g. {bad[:1]}", stage) if bad
                  else Result("ok", f"{len(m.patches)} weights patched, {changed} changed", stage, len(m.patches),
                              changed))
    except (ValueError, OSError) as e:
        msg = str(e)
        result = Result("clear" if _names_file(msg, path) else "unclear", f"{type(e).__name__}: {msg[:300]}", stage)
    except Exception as e:  # noqa: BLE001 -- what the fuzz is looking for
        tb = traceback.extract_tb(e.__traceback__)[-1]
        result = Result("crash", f"{type(e).__name__}: {str(e)[:300]} at {os.path.basename(tb.filename)}:{tb.lineno}",
                        stage)
    finally:
        if m is not None:
            m.unpatch_model()
        path.unlink(missing_ok=True)
    if torch.equal(model_bytes(patcher), original_bytes):
        return result
    changed = [k for k, v in patcher.model.state_dict().items() if not torch.equal(v, original[k])]
    if changed:
        return Result("left_patched", f"{len(changed)} weights changed, e.g. {changed[0]}; {result.detail}", stage)
    return result


def _weight(patcher, key: str) -> torch.Tensor:
    import comfy.utils
    return comfy.utils.get_attr(patcher.model, key)


class Harness:
    """The small model, its snapshot, the seed adapters and a loras folder registered with the host."""

    def __init__(self, loras: Path):
        import folder_paths
        self.loras = Path(loras)
        self.loras.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path("loras", str(self.loras))
        self.patcher = tiny_model()
        self.original = snapshot(self.patcher)
        self.original_bytes = model_bytes(self.patcher)
        self.seeds = seed_adapters(weight_shapes(self.patcher))
        self.count = 0

    def run(self, case: Case) -> Result:
        self.count += 1
        return run_case(case, self.seeds, self.patcher, self.original, self.original_bytes, self.loras, self.count)

    def close(self) -> None:
        import folder_paths
        paths = folder_paths.folder_names_and_paths["loras"][0]
        if str(self.loras) in paths:
            paths.remove(str(self.loras))
