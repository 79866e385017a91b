"""fewstep LoRA math: reading (formats), adapter kinds (adapters/), family layouts (layouts), key mapping (keys),
fusing (fuse), merging (merge), exporting (export), detecting (detect).

Pure torch. Nothing in this package imports ``comfy``: host facts (the model's key map, the diffusers->model map,
base weights, the model's family) are passed in by the node layer as plain values and callables.
"""
