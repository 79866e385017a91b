"""Test-only custom nodes for fewstep's tests (never shipped: the pack is the repository root, not tests/).

``FewStepTestConditioning`` replaces the text encoders of the flow-matching families in tests only (see
``conditioning.py``).  ``tools.hostenv.Server(test_nodes=True)`` adds this folder's parent to the host's
custom-node search path for that one server.
"""
from __future__ import annotations
from comfy_api.v0_0_2 import ComfyExtension, io

from .conditioning import DEFAULT_TOKENS, FAMILIES, make_conditioning


class FewStepTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepTestConditioning", display_name="FewStep Test Conditioning (tests only)",
            category="_for_testing/fewstep",
            description="TESTS ONLY: seeded stand-in for a flow-matching family's text encoder output (shapes and "
                        "pooled outputs of core CLIPTextEncode with the real encoder); replaces the text encoders, "
                        "which are too large for CI.",
            inputs=[io.Combo.Input("family", options=list(FAMILIES), tooltip="Model family whose text encoder "
                                   "output to imitate."),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the values (the 'prompt')."),
                    io.Int.Input("tokens", default=DEFAULT_TOKENS, min=0, max=1024,
                                 tooltip="Token count; 0 = the real encoder's padded length.")],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, family, seed, tokens) -> io.NodeOutput:
        return io.NodeOutput(make_conditioning(family, seed, tokens))


class FewStepTestNodes(ComfyExtension):
    async def get_node_list(self):
        return [FewStepTestConditioning]


async def comfy_entrypoint():
    return FewStepTestNodes()
