"""The synthetic set: seeded, any size, and learnable (the class pattern is recoverable from the images)."""
import torch

from data import build_datasets


def _stack(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def test_deterministic_and_seeded():
    cfg = {"name": "synthetic", "channels": 3, "img_size": 16, "train_size": 20, "val_size": 10, "num_classes": 4}
    (tr1, va1, info), (tr2, va2, _), (tr3, _, _) = (build_datasets({**cfg, "seed": s}) for s in (0, 0, 1))
    x1, y1 = _stack(tr1)
    assert torch.equal(x1, _stack(tr2)[0]) and torch.equal(_stack(va1)[0], _stack(va2)[0])
    assert not torch.equal(x1, _stack(tr3)[0])
    assert not torch.equal(x1[:10], _stack(va1)[0])  # val is not a copy of train
    assert torch.bincount(y1).tolist() == [5] * 4
    assert (info.num_classes, info.in_chans, info.input_size) == (4, 3, (16, 16))


def test_full_resolution_item():
    train, _, info = build_datasets({"name": "synthetic", "channels": 3, "img_size": 224, "train_size": 2})
    x, y = train[1]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1 and info.num_classes == 10
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5  # about unit scale, as after normalisation


def test_learnable():
    """Nearest class mean, fitted on train, classifies val far above chance (1/10)."""
    train, val, _ = build_datasets({"name": "synthetic", "img_size": 16, "train_size": 200, "val_size": 100})
    (xt, yt), (xv, yv) = _stack(train), _stack(val)
    means = torch.stack([xt[yt == c].mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(xv.flatten(1), means).argmin(1)
    assert (predicted == yv).float().mean() > 0.9
