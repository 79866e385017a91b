"""ComfyUI adapters: the only room that imports comfy.* at module level.

`FewStepExtension.get_node_list()` is called once by the host after import; it also registers the
pack's sampler and scheduler names in the KSampler dropdowns (in place, idempotent).
"""
from __future__ import annotations
from comfy_api.v0_0_2 import ComfyExtension, io


class FewStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from . import registry
        from .lora import NODES as LORA_NODES
        from .lora_save import NODES as LORA_SAVE_NODES
        from .presets import NODES as PRESET_NODES
        from .sampling import NODES as SAMPLING_NODES

        registry.register()
        return [*SAMPLING_NODES, *PRESET_NODES, *LORA_NODES, *LORA_SAVE_NODES]
