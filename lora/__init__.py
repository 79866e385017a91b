"""fewstep LoRA math: reading, key mapping, fusing, merging, exporting, detecting.

Pure torch. Nothing in this package imports ``comfy``: host facts (the UNet key
map, the diffusers->LDM map, base weights) are passed in by the node layer as
plain dicts and callables.
"""
