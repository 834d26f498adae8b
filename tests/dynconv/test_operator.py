"""The operator hooks (`dynconv.Operator`) and the model-wide helpers that ask them."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import dynconv
from dynconv.complexity import count_macs
from dynconv.operator import pixel_macs
from models._layers import timm_init

from .op_checks import OpRecord

H = W = 8


def _build(name: str) -> nn.Module:
    kw = {"input_size": (H, W)} if "input_size" in dynconv.op_options(name) else {}
    return dynconv.create_op(name, 16, 16, 3, **kw)


def test_every_registered_operator_is_an_operator():
    for name in dynconv.list_ops():
        assert issubclass(dynconv.get_op(name), dynconv.Operator), name


def test_register_op_refuses_a_class_without_the_hooks():
    with pytest.raises(TypeError, match="must derive from dynconv.Operator"):
        dynconv.register_op("not_an_operator")(nn.Conv2d)
    assert "not_an_operator" not in dynconv.list_ops()


@pytest.mark.parametrize("name", dynconv.list_ops())
def test_backbone_init_follows_has_own_init(name):
    """Each operator's own `has_own_init` decides: True keeps every parameter of its init under the backbone's conv
    init; False lets the backbone's init reach its convs (no list of operators to keep up to date)."""
    torch.manual_seed(0)
    op = _build(name)
    before = {k: v.clone() for k, v in op.state_dict().items()}
    timm_init(name, op)
    changed = [k for k, v in op.state_dict().items() if not torch.equal(v, before[k])]
    has_conv = any(isinstance(m, nn.Conv2d) for m in op.modules())
    assert changed == [] if op.has_own_init else (bool(changed) or not has_conv), changed


@pytest.mark.parametrize("name", dynconv.list_ops())
def test_an_aggregation_the_flop_counter_cannot_see_is_counted(name):
    """A per-pixel aggregation (`pixel_filter`, the deformable samplers) is an elementwise product of B·C·K²·H·W
    elements under the reference backend, which torch's FlopCounterMode does not count: an operator whose forward
    computes one must count it in `aggregation_macs` (a forgotten one would undercount its MACs silently)."""
    op, x = _build(name).eval(), torch.randn(1, 16, H, W)
    with dynconv.use_backend("reference"), torch.no_grad():
        agg = count_macs(op, x)["agg_macs"]
        with OpRecord() as record:
            out = op(x)
    largest = max((n for _, n in record.outputs("mul", "mul_", "addcmul", "addcmul_")), default=0)
    if largest >= pixel_macs(out, 3):
        assert agg >= largest, f"{name}: aggregation_macs gives {agg}, the forward multiplies {largest} elements"


def test_backbone_init_leaves_an_own_init_operator_alone():
    dcn = dynconv.create_op("dcn", 8, 8, 3)
    timm_init("dcn", nn.Sequential(nn.Conv2d(8, 8, 1), dcn))
    assert dcn.conv_offset.weight.abs().sum() == 0  # zero offsets: DCN starts as a plain conv
    inv = dynconv.create_op("involution", 16, 16, 3)
    before = inv.conv2.conv.weight.clone()
    timm_init("involution", inv)
    assert not torch.equal(inv.conv2.conv.weight, before)  # no init of its own: the backbone's applies


class _Logger(dynconv.Operator):
    """A test operator with images and an epoch hook."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag, self.epochs = tag, []

    def tensorboard_images(self):
        return {self.tag: np.zeros((2, 2, 3), np.uint8)}

    def on_epoch_start(self, epoch):
        self.epochs.append(epoch)


def test_model_helpers_reach_nested_operators():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(_Logger("a"), dynconv.create_op("conv", 1, 1, 1)),
                          _Logger("b"), _Logger("c"))
    dynconv.on_epoch_start(model, 3)
    assert model[1][0].epochs == model[2].epochs == model[3].epochs == [3]
    assert list(dynconv.tensorboard_images(model)) == ["1.0/a", "2/b"]  # the first two with images
    assert list(dynconv.tensorboard_images(model, max_modules=None)) == ["1.0/a", "2/b", "3/c"]


def test_tvconv_images_are_hwc_uint8_and_a_frozen_tvconv_has_none():
    tv = dynconv.create_op("tvconv", 8, 8, 3, input_size=(6, 5), affinity_init="normal")
    images = dynconv.tensorboard_images(nn.Sequential(tv))
    assert set(images) == {"0/affinity", "0/filters"}
    for img in images.values():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.min() == 0 and img.max() == 255  # each map is min-max scaled
    # 4 affinity maps of 6×5 in one row; 4 channels × 9 taps of 6×5, one row per channel (1-pixel gaps)
    assert images["0/affinity"].shape[:2] == (7, 4 * 6) and images["0/filters"].shape[:2] == (4 * 7, 9 * 6)
    assert tv.freeze().tensorboard_images() == {}


def test_aggregation_macs_of_a_new_operator_reach_count_macs():
    class Doubler(dynconv.Operator):
        def forward(self, x):
            return 2 * x

        def aggregation_macs(self, out):
            return 7 * out.numel()

    r = count_macs(nn.Sequential(Doubler()), torch.zeros(1, 2, 3, 3))
    assert r["agg_macs"] == r["macs"] == 7 * 18
