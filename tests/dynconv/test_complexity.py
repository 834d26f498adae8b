"""dynconv.complexity.count_macs: FlopCounterMode's convs/linears plus the aggregation it cannot see."""
import torch
import torch.nn as nn

import dynconv
from dynconv.complexity import count_macs, format_macs


def test_conv_macs_are_the_counters():
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    r = count_macs(conv, torch.zeros(1, 4, 6, 6))
    assert r["macs"] == 8 * 4 * 9 * 36 and r["agg_macs"] == 0 and r["act_bytes"] == 8 * 36 * 4


def test_pixel_ops_add_their_aggregation_but_ddf_channel_only_does_not():
    x = torch.zeros(1, 8, 6, 6)
    for name, kw in (("involution", {"group_channels": 4}), ("ddf", {}), ("ddf", {"branches": "spatial"})):
        op = dynconv.create_op(name, 8, 8, 3, stride=2, **kw)
        with_agg = count_macs(op, x)
        assert with_agg["agg_macs"] == 8 * 9 * 3 * 3, name  # C·K²·Ho·Wo at stride 2
    op = dynconv.create_op("ddf", 8, 8, 3, branches="channel")
    r = count_macs(op, x)
    assert r["agg_macs"] == 0 and r["macs"] >= 8 * 9 * 36  # the per-sample depthwise conv is counted by torch
    op.train()
    count_macs(op, x)
    assert op.training  # the mode is restored


def test_dcn_counts_its_deformable_conv_beside_the_offset_conv():
    op = dynconv.create_op("dcn", 16, 16, 3)
    r = count_macs(op, torch.zeros(1, 16, 8, 8))
    offset_conv = 3 * 9 * 16 * 9 * 64  # 27 offset/mask channels, each 16·k² per output pixel
    deform_conv = 16 * 16 * 9 * 64
    assert (offset_conv, deform_conv) == (248_832, 147_456)
    assert r["agg_macs"] == deform_conv and r["macs"] == offset_conv + deform_conv
    grouped = count_macs(dynconv.create_op("dcn", 16, 16, 3, groups=4), torch.zeros(1, 16, 8, 8))
    assert grouped["agg_macs"] == deform_conv // 4


def test_aggregation_is_counted_for_the_whole_batch_like_the_convs():
    op = dynconv.create_op("involution", 8, 8, 3, group_channels=4)
    one, two = count_macs(op, torch.zeros(1, 8, 6, 6)), count_macs(op, torch.zeros(2, 8, 6, 6))
    assert two["agg_macs"] == 2 * one["agg_macs"] and two["macs"] == 2 * one["macs"]


def test_tvconv_inference_form_counts_the_weight_generator_once():
    """The training form runs TVConv's generator per pass; the inference form is the frozen op's per-image MACs
    (a depthwise conv's C·K²·H·W), with what `freeze()` precomputes (the generator pass) counted once, apart."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    op = dynconv.create_op("tvconv", 8, 8, 3, input_size=(6, 6), hidden_channels=16)
    r = count_macs(op, torch.zeros(1, 8, 6, 6))
    with FlopCounterMode(display=False) as counter:
        op.filters()
    generator = counter.get_total_flops() // 2
    assert generator > 0 and r["precomputed_macs"] == generator
    assert r["inference_macs"] == 8 * 9 * 36 and r["macs"] == r["inference_macs"] + generator
    frozen = count_macs(copy.deepcopy(op).freeze(), torch.zeros(1, 8, 6, 6))
    assert frozen["macs"] == frozen["inference_macs"] == r["inference_macs"] and frozen["precomputed_macs"] == 0
    assert format_macs(r) == (f"{r['macs']:,} MACs/image in the training form; inference form (freeze()): "
                              f"{8 * 9 * 36:,} MACs/image + {generator:,} once")


def test_operators_whose_work_is_per_image_have_one_form():
    x = torch.zeros(1, 16, 8, 8)
    for name in ("conv", "involution", "ddf", "condconv", "dyconv", "odconv", "dcd", "dk_local", "dk_global", "dcn"):
        r = count_macs(dynconv.create_op(name, 16, 16, 3), x)
        assert r["precomputed_macs"] == 0 and r["inference_macs"] == r["macs"] > 0, (name, r)
        assert format_macs(r) == f"{r['macs']:,} MACs/image", name
