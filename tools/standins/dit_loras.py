"""DiT LoRA stand-ins: files whose key names and structure mirror released LoRAs for the flow families."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoraFile:
    name: str        # file name in loras/
    role: str        # "acceleration" or "style"
    fmt: str         # key format
    mirrors: str     # the public release / trainer whose layout the file has


def build(fam, lf: LoraFile, path: Path) -> None:
    raise ValueError(f"{fam.key}: no stand-in builder for LoRA format {lf.fmt!r} ({lf.name})")
