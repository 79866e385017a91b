"""Tier b: the family of the host's own DiT models (``nodes.common.model_base``), each built by the host's model
config on the meta device (small Flux / HunyuanVideo configs, the host's defaults otherwise), and FewStep LoRA
Fuse refusing a model of no family it knows, naming it (the DiT fusing itself: test_lora_dit_host.py)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

_SMALL = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 64, "hidden_size": 64,
          "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
          "qkv_bias": True}
FLUX = {**_SMALL, "theta": 10000, "patch_size": 2}
HUNYUAN_VIDEO = {**_SMALL, "theta": 256, "patch_size": [1, 2, 2], "guidance_embed": True, "byt5": False,
                 "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None}

CASES = [  # (comfy.supported_models config, extra unet_config, host model class, family)
    ("SD3", {}, "SD3", "sd3"),
    ("Flux", FLUX, "Flux", "flux"),
    ("WAN21_T2V", {}, "WAN21", "wan"),
    ("WAN21_I2V", {}, "WAN21", "wan"),
    ("WAN22_T2V", {}, "WAN22", "wan22_5b"),
    ("QwenImage", {}, "QwenImage", "qwen_image"),
    ("HunyuanVideo", HUNYUAN_VIDEO, "HunyuanVideo", "hunyuan_video"),
]


def host_model(name: str, extra: dict):
    import comfy.model_patcher
    import comfy.supported_models as sm
    cls = getattr(sm, name)
    cfg = cls({**cls.unet_config, **extra})
    with torch.device("meta"):
        model = cfg.get_model({})
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


@pytest.mark.parametrize("config, extra, host_class, family", CASES, ids=[c[0] for c in CASES])
def test_model_base_names_the_dit_families(host, config, extra, host_class, family):
    from fewstep.nodes.common import model_base
    m = host_model(config, extra)
    assert type(m.model).__name__ == host_class
    assert model_base(m) == family


def test_a_subclass_with_another_architecture_is_not_its_parent(host):
    """WAN22_S2V derives from the host's WAN21 class but is another model (speech-to-video): not "wan"."""
    import comfy.model_base
    from fewstep.nodes.common import model_base
    m = host_model("WAN22_S2V", {})
    assert isinstance(m.model, comfy.model_base.WAN21)
    assert model_base(m) == "unknown"


def test_fuse_refuses_a_model_of_no_known_family(host):
    """A host model class LoRA fusing has no family record for (Wan 2.2 S2V, which derives from WAN21) is refused
    naming the family, before any file is read."""
    from fewstep.nodes import lora as L
    m = host_model("WAN22_S2V", {})
    with pytest.raises(ValueError, match=r"^FewStep LoRA Fuse: the model's family \('unknown'\) is not one LoRA "
                                         r"fusing knows \(supported: sd15, sd2, sdxl, ssd1b, sd3, flux, wan, wan22_5b, "
                                         r"qwen_image, hunyuan_video\)"):
        L.fuse(m, L.NONE, 1.0, [])
    assert not m.patches and "fewstep_fuse" not in m.model_options
