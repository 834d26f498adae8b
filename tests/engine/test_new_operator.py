"""An operator defined outside the repository trains through `train.py` via `+op.module`, no list edited; the
operator that docs/CONTRIBUTING.md prints works as printed."""
import json
import os
import re
import subprocess
import sys

import torch

from engine import checkpoint as ck
from tests.engine.conftest import ROOT, run_train

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


DOC_CHECK = '''
import torch, torch.nn as nn
import dynconv
from dynconv.complexity import count_macs
import my_doc_op

op = dynconv.create_op("myop", 16, 16, 3, stride=2)
x = torch.randn(2, 16, 9, 9, requires_grad=True)
out = op(x)
with dynconv.use_backend("reference"):
    torch.testing.assert_close(out, op(x))
out.sum().backward()
assert out.shape == (2, 16, 5, 5) and all(p.grad is not None for p in op.parameters())
macs = count_macs(op, x[:1].detach())
assert macs["agg_macs"] == 16 * 9 * 25, macs
model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
report = dynconv.replace(model, "myop", "all_3x3", input_size=(9, 9), in_chans=3)
assert [r["op"] for r in report] == ["myop"], report
print("ok")
'''


def test_the_contributing_example_operator_works(tmp_path):
    """docs/CONTRIBUTING.md's operator, as printed: it imports the `pixel_filter` function, registers, runs on both
    backends with gradients, counts its aggregation and replaces a conv."""
    doc = (ROOT / "docs" / "CONTRIBUTING.md").read_text()
    section = doc.split("## An operator", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_doc_op.py").write_text(re.sub(r"^   ", "", code, flags=re.M))  # the list item's indent
    proc = subprocess.run([sys.executable, "-c", DOC_CHECK], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
