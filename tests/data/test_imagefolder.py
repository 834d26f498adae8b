"""imagefolder on a generated folder of real JPEG files, one of them corrupt."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_datasets
from data.config import ConfigError, DataConfig
from tests.engine.conftest import run_train
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
    assert str(bad) in str(err.value) and "data.on_bad_image=skip" in str(err.value)


def test_corrupt_file_from_a_worker_is_one_line_naming_it(folder):
    root, bad = folder
    train, _, _ = build_datasets(_cfg(root))
    with pytest.raises(CorruptImageError) as err:
        list(torch.utils.data.DataLoader(train, batch_size=4, num_workers=1))
    assert str(err.value).startswith(f"cannot decode image file {bad} (") and "\n" not in str(err.value)


def test_on_bad_image_takes_error_or_skip():
    with pytest.raises(ConfigError, match="data.on_bad_image='ignore': must be error or skip"):
        DataConfig(name="imagefolder", on_bad_image="ignore")


def test_skip_substitutes_next_file_and_logs(folder, caplog):
    root, bad = folder
    train, _, info = build_datasets(_cfg(root, on_bad_image="skip", augment=False))
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
    train, val, info = build_datasets(_cfg(root, on_bad_image="skip", aa="rand-m9-mstd0.5-inc1", reprob=0.5,
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
    train, val, info = build_datasets(_cfg(root, channels=1, on_bad_image="skip", aa="rand-m9-mstd0.5"))
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


@pytest.mark.parametrize("folder", ["truncated"], indirect=True)
@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_train_py_names_the_bad_file_in_one_line_or_skips_it(folder, tmp_path, on_bad_image):
    root, bad = folder
    run = tmp_path / "run"
    proc = run_train(["model=resnet50", "model.width=0.125", "model.small_input=true", "data=imagefolder",
                      f"data.root={root}", "data.img_size=16", "data.batch_size=5", "data.workers=0",
                      "trainer.epochs=1", "trainer.progress=false", "trainer.count_flops=false",
                      f"data.on_bad_image={on_bad_image}"], run, check=False, tiny=False)
    log = (run / "train.log").read_text()
    if on_bad_image == "error":
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"train.py: error: cannot decode image file {bad} (")
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"skipped corrupt image {bad}" in log and "1 corrupt file(s) skipped so far" in log
