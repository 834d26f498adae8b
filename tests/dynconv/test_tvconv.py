"""TVConv: the paper's translation-variant conv as loops, freeze(), resolution handling, key layout."""
import pytest
import torch
from torch.func import functional_call

import dynconv
from dynconv.ops.tvconv import TVConv


def _op(stride=1, input_size=(6, 5), C=4, **kw):
    torch.manual_seed(0)
    op = TVConv(C, C, 3, stride, input_size=input_size, hidden_channels=4, hidden_layers=1, **kw)
    with torch.no_grad():  # move away from the all-ones / identity initialisation so every term matters
        for name, p in op.named_parameters():
            if "posi_map" in name or p.dim() == 3:  # affinity maps and LayerNorm affine maps
                p.add_(0.5 * torch.randn_like(p))
    return op


@pytest.mark.parametrize("stride,size", [(1, (6, 5)), (2, (7, 6))])
def test_matches_paper_equation(naive_aggregate, backend, stride, size):
    """W = B(A) (the generator run as the official nn.Sequential with nn.LayerNorm), then
    out[b,c,i,j] = Σ_k W[c,k,i,j] · x[b, c, i·s − 1 + kh, j·s − 1 + kw] with W shared by the batch."""
    op = _op(stride, size)
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        w = op.weight_layers(op.posi_map).view(4, 9, *op.output_size).tolist()
        out = op(x)
    expected = naive_aggregate(x, lambda b, c, kh, kw, i, j: w[c][kh * 3 + kw][i][j], 3, stride, 1, op.output_size)
    assert op.output_size == (-(-size[0] // stride), -(-size[1] // stride))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_affinity_maps_start_as_ones():
    op = TVConv(8, 8, 3, 2, input_size=(9, 8))
    assert op.posi_map.shape == (1, 4, 5, 4) and bool((op.posi_map == 1).all())


def test_gradcheck(backend):
    op = _op(2, (4, 3), bias_maps=True).double()
    names = ("posi_map", "weight_layers.2.weight", "bias_layers.0.1.weight")
    params = {n: p.detach().clone().requires_grad_() for n, p in op.named_parameters() if n in names}

    def f(x, *ps):
        return functional_call(op, dict(zip(params, ps)), (x,))

    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *params.values()))


@pytest.mark.parametrize("stride,size", [(1, (6, 5)), (2, (7, 6)), (2, (8, 8))])
def test_freeze_gives_equal_output(stride, size):
    op = _op(stride, size, bias_maps=True)
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        before = op(x)
        op.freeze()
        after = op(x)
    assert not any("weight_layers" in k or "posi_map" in k for k in op.state_dict())
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_wrong_resolution_names_expected_size():
    op = _op(2, (9, 8))
    with pytest.raises(ValueError, match="built for 9x8 inputs .* got 10x8"):
        op(torch.randn(1, 4, 10, 8))
    op.freeze()
    with pytest.raises(ValueError, match="built for 9x8"):
        op(torch.randn(1, 4, 10, 8))


@pytest.mark.parametrize("stride,size,expected", [(1, (9, 7), (9, 7)), (2, (12, 9), (6, 5))])
def test_resize_affinity(stride, size, expected):
    op = _op(stride, (6, 5), resize_affinity=True, bias_maps=True)
    out = op(torch.randn(2, 4, *size))
    assert out.shape == (2, 4, *expected)
    out.sum().backward()
    assert op.posi_map.grad is not None and op.weight_layers[0][1].weight.grad.shape == (4, *op.output_size)


def test_resize_path_at_native_size_is_the_plain_generator():
    op = _op(1, (6, 5), resize_affinity=True)
    with torch.no_grad():
        w, _ = op.filters((6, 5))
        torch.testing.assert_close(w.flatten(), op.weight_layers(op.posi_map).flatten())


def test_registry_and_errors():
    op = dynconv.create_op("tvconv", 8, 8, 3, stride=2, input_size=(12, 12))
    assert isinstance(op, TVConv) and op.output_size == (6, 6)
    with pytest.raises(ValueError, match="1x1 projection"):
        dynconv.create_op("tvconv", 8, 16, 3, input_size=(12, 12))
    with pytest.raises(ValueError, match="input_size"):
        dynconv.create_op("tvconv", 8, 8, 3)


def test_official_key_layout():
    """Face MobileNetV2 features.1 TVConv: 32 channels at 96×96, 4 maps, width 64, 3 inner layers."""
    shapes = {k: tuple(v.shape) for k, v in TVConv(32, 32, 3, input_size=(96, 96)).state_dict().items()}
    expected = {"posi_map": (1, 4, 96, 96), "weight_layers.4.weight": (288, 64, 3, 3)}
    for i in range(4):
        expected[f"weight_layers.{i}.0.weight"] = (64, 4 if i == 0 else 64, 3, 3)
        expected[f"weight_layers.{i}.1.weight"] = expected[f"weight_layers.{i}.1.bias"] = (64, 96, 96)
    assert shapes == expected


def _data_maps(x, channels, out_size):
    """The documented "data" recipe, written out statistic by statistic (population std throughout)."""
    B, C, H, W = x.shape
    v = x.permute(2, 3, 0, 1).reshape(H, W, B * C).double()
    stats = [v.mean(-1), ((v - v.mean(-1, keepdim=True)) ** 2).mean(-1).sqrt(), v.abs().mean(-1), v.max(-1).values]
    maps = []
    for s in stats:
        s = torch.nn.functional.adaptive_avg_pool2d(s[None], out_size)[0]
        maps.append((s - s.mean()) / ((s - s.mean()) ** 2).mean().sqrt() + 1)
    return torch.stack([maps[i % 4] for i in range(channels)])[None].float()


def test_affinity_init_normal_is_n_1_1():
    torch.manual_seed(0)
    a = TVConv(4, 4, 3, input_size=(32, 32), hidden_channels=4, hidden_layers=0, affinity_init="normal").posi_map
    assert abs(a.mean().item() - 1) < 0.05 and abs(a.std().item() - 1) < 0.05  # 4096 draws: 3σ ≈ 0.047
    assert a.unique().numel() == a.numel()


@pytest.mark.parametrize("stride,size,channels", [(1, (6, 5), 4), (2, (7, 6), 6)])
def test_affinity_init_data_uses_the_first_training_batch(stride, size, channels):
    op = TVConv(4, 4, 3, stride, input_size=size, hidden_channels=4, hidden_layers=1, affinity_channels=channels,
                affinity_init="data")
    x = 2 * torch.randn(3, 4, *size) + torch.linspace(0, 1, size[1])
    out = op(x)
    expected = _data_maps(x, channels, op.output_size)
    torch.testing.assert_close(op.posi_map.detach(), expected, atol=1e-5, rtol=1e-5)
    assert bool(op.affinity_initialised)
    flat = op.posi_map.detach().flatten(2)
    torch.testing.assert_close(flat.mean(-1), torch.ones(1, channels), atol=1e-5, rtol=0)  # centred at 1
    torch.testing.assert_close(flat.std(-1, unbiased=False), torch.ones(1, channels), atol=1e-5, rtol=0)
    with torch.no_grad():  # the first batch already runs with the new maps
        torch.testing.assert_close(out, op.eval()(x))


def test_affinity_init_data_happens_once_and_only_in_training():
    op = TVConv(4, 4, 3, input_size=(5, 5), hidden_channels=4, hidden_layers=0, affinity_init="data")
    x = torch.randn(2, 4, 5, 5)
    op.eval()(x)  # an eval-mode pass (e.g. the dry pass measuring sizes) does not initialise
    assert not bool(op.affinity_initialised) and bool((op.posi_map == 1).all())
    op.train()(x)
    first = op.posi_map.detach().clone()
    op(torch.randn(2, 4, 5, 5) * 5)
    torch.testing.assert_close(op.posi_map.detach(), first, atol=0, rtol=0)
    torch.testing.assert_close(first, _data_maps(x, 4, (5, 5)), atol=1e-5, rtol=1e-5)


def test_affinity_initialised_buffer_round_trips():
    make = lambda: TVConv(4, 4, 3, input_size=(5, 5), hidden_channels=4, hidden_layers=0,  # noqa: E731
                          affinity_init="data")
    src = make()
    src(torch.randn(2, 4, 5, 5))
    state = src.state_dict()
    assert "affinity_initialised" in state and bool(state["affinity_initialised"])
    dst = make()
    dst.load_state_dict(state)
    dst(torch.randn(2, 4, 5, 5) * 3)  # a loaded, initialised layer is not initialised again
    torch.testing.assert_close(dst.posi_map, src.posi_map, atol=0, rtol=0)
    assert "affinity_initialised" not in TVConv(4, 4, 3, input_size=(5, 5)).state_dict()
    assert "affinity_initialised" not in TVConv(4, 4, 3, input_size=(5, 5), affinity_init="normal").state_dict()


def test_affinity_init_data_gradcheck_and_freeze(backend):
    op = TVConv(4, 4, 3, 2, input_size=(4, 3), hidden_channels=4, hidden_layers=1, bias_maps=True,
                affinity_init="data")
    with pytest.raises(ValueError, match="not initialised the affinity maps yet"):
        op.freeze()
    op(torch.randn(2, 4, 4, 3))
    op = op.double()
    params = {n: p.detach().clone().requires_grad_() for n, p in op.named_parameters()
              if n in ("posi_map", "weight_layers.1.0.weight", "bias_layers.0.1.weight")}

    def f(x, *ps):
        return functional_call(op, dict(zip(params, ps)), (x,))

    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *params.values()))
    with torch.no_grad():
        before = op(x)
        op.freeze()
        after = op(x)
    assert set(op.state_dict()) == {"frozen_weight", "frozen_bias_map"}
    torch.testing.assert_close(after, before, atol=1e-12, rtol=1e-12)


def test_affinity_init_error_names_choices():
    with pytest.raises(ValueError, match=r"affinity_init must be one of \('ones', 'normal', 'data'\), got 'zeros'"):
        dynconv.create_op("tvconv", 8, 8, 3, input_size=(12, 12), affinity_init="zeros")
