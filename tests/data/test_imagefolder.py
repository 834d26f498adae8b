"""imagefolder on a generated folder of real JPEG files, one of them corrupt."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_datasets
from data.imagefolder import CorruptImageError

CLASSES = ("cat", "dog", "owl")


def _jpeg(rng, size=(40, 32)):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _corrupt(kind, rng):
    if kind == "truncated":  # a valid header, then the data stops: only decoding finds it
        data = _jpeg(rng)
        data = data[:len(data) // 2]
        assert Image.open(io.BytesIO(data)).size == (40, 32)
        return data
    return b"not an image at all" * 10


@pytest.fixture(params=["truncated", "garbage"])
def folder(request, tmp_path):
    """train: 3 classes x 3 JPEGs plus one corrupt file in dog/; val: 2 JPEGs per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / name / f"{i}.jpg").write_bytes(_jpeg(rng))
    bad = tmp_path / "train" / "dog" / "1b.jpg"  # sorts between dog/1.jpg and dog/2.jpg
    bad.write_bytes(_corrupt(request.param, rng))
    return tmp_path, bad


def _cfg(root, **kw):
    return {"name": "imagefolder", "root": str(root), "img_size": 24, "channels": 3, **kw}


def test_corrupt_file_error_names_it(folder):
    root, bad = folder
    train, _, _ = build_datasets(_cfg(root))
    with pytest.raises(CorruptImageError) as err:
        list(torch.utils.data.DataLoader(train, batch_size=4))
    assert str(bad) in str(err.value) and "data.skip_corrupt=true" in str(err.value)


def test_skip_corrupt_substitutes_next_file_and_logs(folder, caplog):
    root, bad = folder
    train, _, info = build_datasets(_cfg(root, skip_corrupt=True, augment=False))
    assert len(train) == 10 and info.num_classes == 3
    index = [path for path, _ in train.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="data.imagefolder"):
        items = [train[i] for i in range(len(train))] + [train[index]]
    x, y = items[index]
    torch.testing.assert_close(x, items[index + 1][0])  # the next file in index order took its place
    assert y == items[index + 1][1] == CLASSES.index("dog")
    skips = [r.getMessage() for r in caplog.records if "skipped corrupt image" in r.getMessage()]
    assert len(skips) == 1 and str(bad) in skips[0] and "1 corrupt file(s) skipped" in skips[0]
    assert train.skipped == {str(bad)}


def test_transforms_and_labels(folder):
    root, _ = folder
    train, val, info = build_datasets(_cfg(root, skip_corrupt=True, aa="rand-m9-mstd0.5-inc1", reprob=0.5,
                                           interpolation="bicubic"))
    assert (info.in_chans, info.input_size) == (3, (24, 24)) and len(info.mean) == 3
    assert val.classes == list(CLASSES) and sorted(val.targets) == [0, 0, 1, 1, 2, 2]
    x, y = train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 0
    a, b = val[5][0], val[5][0]
    assert a.shape == (3, 24, 24) and torch.equal(a, b)  # eval: resize + center crop, deterministic
    # eval pixels are the normalised center crop of the resized image: undoing the normalisation gives [0, 1]
    pixels = a * torch.tensor(info.std).view(3, 1, 1) + torch.tensor(info.mean).view(3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_gray_and_val_uses_train_classes(folder):
    root, _ = folder
    for path in (root / "val" / "cat").iterdir():
        path.unlink()
    (root / "val" / "cat").rmdir()
    train, val, info = build_datasets(_cfg(root, channels=1, skip_corrupt=True, aa="rand-m9-mstd0.5"))
    assert train[0][0].shape == (1, 24, 24) and val[0][0].shape == (1, 24, 24) and info.in_chans == 1
    assert val.class_to_idx == train.class_to_idx and sorted(val.targets) == [1, 1, 2, 2]
    (root / "val" / "bat").mkdir()
    with pytest.raises(ValueError, match="bat"):
        build_datasets(_cfg(root))


def test_config_errors(folder, tmp_path):
    root, _ = folder
    with pytest.raises(ValueError, match="num_classes=5"):
        build_datasets(_cfg(root, num_classes=5))
    with pytest.raises(ValueError, match="needs data.root"):
        build_datasets({"name": "imagefolder"})
    with pytest.raises(FileNotFoundError, match="ImageNet layout"):
        build_datasets(_cfg(tmp_path / "nowhere"))
