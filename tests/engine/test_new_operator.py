"""An operator defined outside the repository trains through `train.py` via `+op.module`, no list edited."""
import json

import torch

from engine import checkpoint as ck
from tests.engine.conftest import run_train

OP_MODULE = '''
import torch
import torch.nn as nn
import dynconv


@dynconv.register_op("scaled_conv")
class ScaledConv(dynconv.Operator):
    has_own_init = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, *, scale=1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias)
        nn.init.constant_(self.conv.weight, 0.01)  # its own init: the backbone's must leave it
        self.scale = scale
        self.register_buffer("last_epoch", torch.tensor(-1))

    def on_epoch_start(self, epoch):
        self.last_epoch.fill_(epoch)

    def forward(self, x):
        return self.scale * self.conv(x)
'''


def test_an_operator_in_a_new_module_trains_one_step(tmp_path):
    (tmp_path / "my_ops.py").write_text(OP_MODULE)
    run = tmp_path / "run"
    run_train(["op.name=scaled_conv", "+op.module=my_ops", "+op.scale=0.5", "policy=deep_only",
               "data.train_size=16", "data.val_size=16", "trainer.epochs=1"], run, env={"PYTHONPATH": str(tmp_path)})
    report = json.loads((run / "replacement.json").read_text())
    assert report and {r["op"] for r in report} == {"scaled_conv"}
    state = ck.load(run / "checkpoints" / "last.pt")
    assert state["num_updates"] == 1
    for layer in (r["layer"] for r in report):
        w = state["model"][f"{layer}.conv.weight"]
        # one SGD step from the operator's own constant init: near 0.01, and moved
        assert not torch.equal(w, torch.full_like(w, 0.01)) and (w - 0.01).abs().max() < 0.01, layer
        assert int(state["model"][f"{layer}.last_epoch"]) == 0, f"{layer}: on_epoch_start was not called"
