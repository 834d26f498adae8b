"""dynconv.complexity.count_macs: FlopCounterMode's convs/linears plus the aggregation it cannot see."""
import torch
import torch.nn as nn

import dynconv
from dynconv.complexity import count_macs


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
