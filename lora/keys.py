"""Map adapter module names onto host UNet weight keys.

One algorithm: normalise every spelling of a UNet module name to one canonical
underscore form, and look it up in a table built from host facts the node
layer passes in (never imported from ``comfy`` here):

* ``host_key_map``: ComfyUI's ``comfy.lora.model_lora_keys_unet(model, {})``
  result, lora-key-prefix -> host weight key (``diffusion_model.<ldm>.weight``);
* ``diffusers_to_ldm``: ComfyUI's ``comfy.utils.unet_to_diffusers(unet_config)``
  result, ``down_blocks.0.attentions.0.proj_in.weight`` ->
  ``input_blocks.1.1.proj_in.weight`` (no ``diffusion_model.`` prefix).

The family's ``lora.layouts.KeyLayout`` holds what differs per family (the prefixes, the host key prefix, the
block names of the report); the UNet families share ``UNET_KEYS``.

Canonical form: strip the layout's known prefixes (UNet: ``lora_unet_``, sd-scripts OFT ``oft_unet_``,
``lycoris_``, ``unet.``, ``base_model.model.``, ``unet.base_model.model.``, ``model.diffusion_model.``,
``diffusion_model.``), drop old attention-processor segments (``.processor``),
replace ``.`` by ``_``, and append ``_0`` to a bare ``to_out``. Both LDM
(``input_blocks_1_1_proj_in``) and diffusers (``down_blocks_0_attentions_0_proj_in``)
spellings are entered, so kohya, PEFT (``unet.…attn1.to_q`` which ComfyUI drops),
``.lora.down/up``, ``lora_linear_layer`` and attn-processor files all resolve.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from .layouts import UNET_KEYS, KeyLayout

LOG = logging.getLogger("fewstep")


def canonical(name: str, layout: KeyLayout = UNET_KEYS) -> str:
    """Canonical underscore form of a module name (any spelling, with or without ``.weight``) under ``layout``.

    >>> canonical("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out")
    'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0'
    """
    n = name
    if n.endswith(".weight"):
        n = n[: -len(".weight")]
    changed = True
    while changed:
        changed = False
        for p in layout.prefixes:
            if n.startswith(p):
                n = n[len(p):]
                changed = True
    n = n.replace(".", "_")
    n = n.replace("_processor_", "_")
    if n.endswith("_to_out"):
        n += "_0"
    return n


class KeyMapper:
    """Lookup table canonical-name -> host weight key.

    Args:
        host_key_map: lora-key -> host weight key (ComfyUI ``model_lora_keys_unet``).
        diffusers_to_ldm: diffusers weight name -> LDM weight name (ComfyUI ``unet_to_diffusers``).
        layout: the family's key layout (prefixes stripped from module names, host key prefix).
    """

    def __init__(self, host_key_map: dict[str, str], diffusers_to_ldm: dict[str, str] | None = None,
                 layout: KeyLayout = UNET_KEYS):
        self.layout = layout
        host_prefix = layout.host_prefix
        self.table: dict[str, str] = {}
        self.ambiguous: dict[str, set[str]] = {}
        host_weights = {v for v in host_key_map.values() if isinstance(v, str) and v.endswith(".weight")}
        self.host_weights = host_weights
        for hk in sorted(host_weights):
            self._add(self.canonical(hk), hk)
        for dk, lk in (diffusers_to_ldm or {}).items():
            if not dk.endswith(".weight"):
                continue
            hk = host_prefix + lk
            if host_weights and hk not in host_weights:
                continue  # e.g. unet_to_diffusers lists a downsampler the model lacks
            self._add(self.canonical(dk), hk)
        for lk, hk in host_key_map.items():
            if isinstance(hk, str) and hk.endswith(".weight"):
                self._add(self.canonical(lk), hk)
        if self.ambiguous:
            LOG.warning("fewstep key map: %d module names map to several host weights, e.g. %s",
                        len(self.ambiguous), next(iter(self.ambiguous)))

    def canonical(self, name: str) -> str:
        return canonical(name, self.layout)

    def _add(self, canon: str, host_key: str) -> None:
        old = self.table.get(canon)
        if old is None:
            self.table[canon] = host_key
        elif old != host_key:
            self.ambiguous.setdefault(canon, {old}).add(host_key)

    def lookup(self, module: str) -> str | None:
        """Host weight key for ``module`` or None (also None when the name is ambiguous)."""
        c = self.canonical(module)
        if c in self.ambiguous:
            return None
        return self.table.get(c)

    def match(self, modules: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """Map module names; returns (matched module -> host key, unmatched modules in input order)."""
        matched: dict[str, str] = {}
        unmatched: list[str] = []
        for m in modules:
            hk = self.lookup(m)
            if hk is None:
                unmatched.append(m)
            else:
                matched[m] = hk
        return matched, unmatched


def group_unmatched(unmatched: Iterable[str], layout: KeyLayout = UNET_KEYS) -> dict[str, list[str]]:
    """Group unmatched module names by model block (for a loud, short report)."""
    groups: dict[str, list[str]] = {}
    for m in unmatched:
        hit = re.search(layout.block_re, canonical(m, layout))
        groups.setdefault(hit.group(1) if hit else "other", []).append(m)
    return groups


def require_all_matched(path: str, unmatched: list[str], limit: int = 5, layout: KeyLayout = UNET_KEYS) -> None:
    """Raise ``ValueError`` naming the file and the first unmatched keys when any module is unmatched."""
    if not unmatched:
        return
    groups = group_unmatched(unmatched, layout)
    by_block = ", ".join(f"{b}: {len(v)}" for b, v in sorted(groups.items()))
    raise ValueError(f"{path}: {len(unmatched)} module(s) match no weight of the loaded model "
                     f"(by block: {by_block}); first: {unmatched[:limit]}. Is the adapter made for another "
                     f"base model (e.g. SD1.5 vs SDXL)?")
