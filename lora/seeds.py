"""Per-key seeds: sha256 of (seed, key, …) so a key's random draw never depends on which other keys exist or the
order they are processed in (DARE masks in ``lora.merge``, SVD sketches in ``lora.export``)."""
from __future__ import annotations

import hashlib


def seed_for(seed: int, *parts: object) -> int:
    """A 63-bit generator seed from ``seed`` and ``parts`` (a key name, an adapter index, ...)."""
    text = "\x00".join([str(int(seed)), *(str(int(p)) if isinstance(p, int) else str(p) for p in parts)])
    h = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
