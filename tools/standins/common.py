"""What every stand-in builder shares: the cache folder, the content hash, seeded generators, atomic saves."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from tools import hostenv

SEED = 20261125
PACKAGE = Path(__file__).resolve().parent


def cache_root() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep")) / "standins"


def content_hash() -> str:
    """Hash of every builder module and the host version: a change to either rebuilds the stand-ins."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(hostenv.host_version().encode())
    return h.hexdigest()[:12]


def gen(name: str, salt: str = "") -> torch.Generator:
    """A generator seeded from a tensor name (and a per-file salt, so two files with one layout differ)."""
    return torch.Generator().manual_seed(SEED ^ int(hashlib.sha256((salt + name).encode()).hexdigest()[:12], 16))


def save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically (a crash never leaves a half-written stand-in behind)."""
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
