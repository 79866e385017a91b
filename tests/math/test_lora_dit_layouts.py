"""lora.families / lora.merge: the DiT block layouts take the loaded model's depth; their vectors, slots, presets,
LiNeS depth and the wrong-length message; the key layouts' aliases (row ranges, swapped halves)."""
from __future__ import annotations

import pytest

from fewstep.lora.families import family
from fewstep.lora.keys import KeyMapper, Target
from fewstep.lora.merge import block_of, depth_count, lines_scale, parse_block_weights


def bound(name: str, blocks: dict[str, int]):
    return family(name).blocks.bind(f"{p}_{i}_x" for p, n in blocks.items() for i in range(n))


@pytest.mark.parametrize("name,blocks,long_head,short", [
    ("flux", {"double_blocks": 19, "single_blocks": 38}, ("CLIP", "T5", "IN", "D00"), 57),
    ("hunyuan_video", {"double_blocks": 20, "single_blocks": 40}, ("BASE", "IN", "D00"), 60),
    ("sd3", {"joint_blocks": 24}, ("BASE", "IN", "J00"), 24),
    ("wan", {"blocks": 30}, ("BASE", "IN", "B00"), 30),
    ("wan22_5b", {"blocks": 30}, ("BASE", "IN", "B00"), 30),
    ("qwen_image", {"transformer_blocks": 60}, ("BASE", "IN", "B00"), 60),
])
def test_dit_vectors_follow_the_model_depth(name, blocks, long_head, short):
    layout = bound(name, blocks)
    long_ = layout.slots(max(layout.counts))
    assert layout.counts == [short, short + len(long_head) - 1 + 1] and long_[:len(long_head)] == long_head
    assert long_[-1] == "OUT" and depth_count(layout) == short
    assert parse_block_weights(",".join(["0.5"] * short), layout).values == (0.5,) * short
    with pytest.raises(ValueError, match=rf"{layout.name} block weights need {short} or {len(long_)} values, got 3 "
                                         rf"\(slots: "):
        parse_block_weights("1,1,1", layout)
    with pytest.raises(ValueError, match="bind it to the model's weight names first"):
        parse_block_weights("1", family(name).blocks)  # a DiT layout needs the model's depth
    none = parse_block_weights("NONE", layout)
    assert none.weight("IN") == 0 and none.weight(long_[len(long_head) - 1]) == 0 and none.te_weight == 0
    with pytest.raises(ValueError, match="needs input and output blocks"):
        parse_block_weights("OUTD", layout)


def test_flux_lbw_61_slots_and_lines_depth():
    layout = bound("flux", {"double_blocks": 19, "single_blocks": 38})
    assert layout.counts == [57, 61]  # LoRA-Block-Weight's Flux vector
    vec = ["1"] * 61
    vec[0], vec[2], vec[3 + 5], vec[3 + 19 + 37], vec[60] = "0.1", "0.2", "0.3", "0.4", "0.5"
    bw = parse_block_weights(",".join(vec), layout)
    assert bw.te_weight == 0.1  # CLIP scales the text-encoder parts
    assert bw.for_key("diffusion_model.img_in.weight") == 0.2 and bw.for_key("diffusion_model.txt_in.weight") == 0.2
    assert bw.for_key("diffusion_model.double_blocks.5.img_attn.qkv.weight") == 0.3
    assert bw.for_key("diffusion_model.single_blocks.37.linear2.weight") == 0.4
    assert bw.for_key("diffusion_model.final_layer.linear.weight") == 0.5
    assert block_of("diffusion_model.single_blocks.0.linear1.weight", layout) == "S00"
    # LiNeS: double blocks first (l = 1..19), then single (20..57); outside the stack alpha
    assert lines_scale("diffusion_model.double_blocks.0.img_mod.lin.weight", layout, 0.2, 0.8) == pytest.approx(0.2)
    assert lines_scale("diffusion_model.single_blocks.37.linear1.weight", layout, 0.2, 0.8) == pytest.approx(1.0)
    assert lines_scale("diffusion_model.single_blocks.0.linear1.weight", layout, 0.2, 0.8) == pytest.approx(
        0.2 + 0.8 * 19 / 56)
    assert lines_scale("diffusion_model.guidance_in.in_layer.weight", layout, 0.2, 0.8) == 0.2


def test_wan_and_hunyuan_video_aliases():
    """Aliases the host's map lacks: Wan's diffusers names; HunyuanVideo's diffusers q/k/v/proj_mlp as rows of the
    fused weights (sizes from the weight's input width) and norm_out with its halves swapped."""
    wan = KeyMapper({"diffusion_model.blocks.0.self_attn.q.weight": "diffusion_model.blocks.0.self_attn.q.weight",
                     "diffusion_model.blocks.0.modulation": "diffusion_model.blocks.0.modulation",
                     "diffusion_model.blocks.0.norm3.weight": "diffusion_model.blocks.0.norm3.weight"},
                    layout=family("wan").keys)
    assert wan.lookup("transformer.blocks.0.attn1.to_q") == "diffusion_model.blocks.0.self_attn.q.weight"
    assert wan.lookup("blocks.0.scale_shift_table") == "diffusion_model.blocks.0.modulation"
    assert wan.lookup("lora_unet_blocks_0_norm2") == "diffusion_model.blocks.0.norm3.weight"
    hv_keys = ["diffusion_model.single_blocks.0.linear1.weight", "diffusion_model.final_layer.adaLN_modulation.1.weight",
               "diffusion_model.txt_in.individual_token_refiner.blocks.1.self_attn.qkv.weight"]
    shapes = {hv_keys[0]: (7 * 64, 64), hv_keys[1]: (128, 64), hv_keys[2]: (192, 64)}
    hv = KeyMapper({k: k for k in hv_keys}, layout=family("hunyuan_video").keys, shapes=shapes)
    assert hv.lookup_target("transformer.single_transformer_blocks.0.attn.to_k") == Target(hv_keys[0], 64, 64)
    assert hv.lookup_target("transformer.single_transformer_blocks.0.proj_mlp") == Target(hv_keys[0], 192, None)
    assert hv.lookup_target("transformer.norm_out.linear") == Target(hv_keys[1], swap_halves=True)
    assert hv.lookup_target("transformer.context_embedder.token_refiner.refiner_blocks.1.attn.to_v") == \
        Target(hv_keys[2], 128, 64)
    assert Target(hv_keys[1], swap_halves=True).rows(4).tolist() == [2, 3, 0, 1]
    assert Target("k", 192, None).rows(448).tolist() == list(range(192, 448))
    with pytest.raises(ValueError, match="do not fit"):
        Target("k", 100, 64).rows(128)
