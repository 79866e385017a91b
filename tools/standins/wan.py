"""Wan 2.1 T2V and Wan 2.2 A14B T2V experts (host class ``comfy.model_base.WAN21`` for all three).

The host reads dim from ``head.modulation``, heads = dim / 128, ffn from ``blocks.0.ffn.0.weight`` and the depth
from the block count; text width 4096 (umT5-XXL) is fixed.  Two widths keep the real compatibility rule (a LoRA for
the 1.3B model does not fit the 14B ones, a Wan 2.1 14B LoRA fits the Wan 2.2 experts):

* ``t2v``: 1.3B-style layout, dim 128 (1 head), ffn 384, 2 blocks;
* ``high_noise`` / ``low_noise``: the 14B layout of the two Wan 2.2 A14B experts, dim 256 (2 heads), ffn 768,
  2 blocks, one file each with its own seed.

Both decode with the Wan 2.1 VAE (``vae.py`` of the Wan repository), whose width the host reads from the file;
dim 8 (the release has 96) decodes a few tiny frames in about a second on a CPU.
"""
from __future__ import annotations

from .flow import Family, ModelFile, VaeFile


def _config(dim: int, ffn: int, layers: int) -> dict:
    return dict(image_model="wan2.1", dim=dim, out_dim=16, num_heads=dim // 128, ffn_dim=ffn, num_layers=layers,
                patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                eps=1e-6, in_dim=16, model_type="t2v")


T2V = ModelFile(name="fewstep-standin-wan2.1_t2v_1.3B_bf16.safetensors", config=_config(128, 384, 2),
                mirrors="Comfy-Org/Wan_2.1_ComfyUI_repackaged wan2.1_t2v_1.3B_bf16.safetensors (Wan names)")
HIGH = ModelFile(name="fewstep-standin-wan2.2_t2v_high_noise_14B_bf16.safetensors", config=_config(256, 768, 2),
                 mirrors="Comfy-Org/Wan_2.2_ComfyUI_Repackaged wan2.2_t2v_high_noise_14B_fp16.safetensors")
LOW = ModelFile(name="fewstep-standin-wan2.2_t2v_low_noise_14B_bf16.safetensors", config=_config(256, 768, 2),
                mirrors="Comfy-Org/Wan_2.2_ComfyUI_Repackaged wan2.2_t2v_low_noise_14B_fp16.safetensors")

VAE_DIM = 8
WAN21_VAE = VaeFile(
    name="fewstep-standin-wan_2.1_vae.safetensors",
    detect={"decoder.middle.0.residual.0.gamma": (4 * VAE_DIM, 1, 1, 1), "decoder.head.0.gamma": (VAE_DIM, 1, 1, 1)},
    mirrors="Comfy-Org/Wan_2.1_ComfyUI_repackaged wan_2.1_vae.safetensors (encoder.*, decoder.*, conv1, conv2)")

FAMILY = Family(
    key="wan", host_class="WAN21", model_sampling="ModelSamplingDiscreteFlow",
    sampling_defaults={"shift": 8.0, "multiplier": 1000},
    sampling_node=("ModelSamplingSD3", {"shift": 8.0}),
    models={"t2v": T2V, "high_noise": HIGH, "low_noise": LOW}, vae=WAN21_VAE,
    latent=("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 5, "batch_size": 1}),
    latent_shape=(1, 16, 2, 8, 8),
    notes="CONST prediction, shift 8 from the host (workflows set 5-8 with ModelSamplingSD3); 4n+1 frames -> "
          "n+1 latent frames.")
