"""scripts/predict.py: each image file through the checkpoint's evaluation transforms, its top-k class names
(Fashion-MNIST's, the ImageFolder's folders, ImageNet's descriptions), face embeddings, and bad input."""
import csv
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_datasets
from data.mnist import FASHION_MNIST_CLASSES
from engine.config import ConfigError
from scripts.predict import predict
from tests.data.test_mnist import idx_root  # noqa: F401  (a tiny Fashion-MNIST folder)
from tests.engine.conftest import TINY_MODEL
from tests.scripts.conftest import TINY_RUN, run_script, write_checkpoint

# float32 logits of one image alone or in a batch differ in the last bits; probabilities are written with 6 decimals
PROB_TOL = 1e-5


def run_predict(script_config, ckpt, inputs, out, *extra):
    overrides = [f"checkpoint={ckpt}", f"inputs={inputs}", f"output={out}", *extra]
    cfg, compose = script_config("predict", overrides)
    return predict(cfg, overrides, compose)


def read_rows(path):
    rows = list(csv.reader(open(path)))
    return rows[0], {row[0]: row[1:] for row in rows[1:]}


def expected_topk(model, x, names, k):
    with torch.no_grad():
        prob, idx = model(x[None]).softmax(1)[0].topk(k)
    return [names[i] for i in idx.tolist()], prob.tolist()


def check_row(row, names, probs):
    assert row[0::2] == names
    np.testing.assert_allclose([float(p) for p in row[1::2]], probs, atol=PROB_TOL, rtol=0)


def test_fashion_mnist_names_and_eval_transform(tmp_path, idx_root, script_config, caplog):  # noqa: F811
    overrides = TINY_MODEL + ["data=fashion_mnist", f"data.root={idx_root}", "data.workers=0", "data.batch_size=4"]
    ckpt, cfg, model = write_checkpoint(tmp_path / "best.pt", overrides)
    _, val, _ = build_datasets(cfg.data)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    files = [tmp_path / "in" / ("sub" if i % 2 else "") / f"{i}.png" for i in range(len(val))]
    for i, file in enumerate(files):  # the validation images themselves, as files
        Image.fromarray(val.images[i].numpy()).save(file)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        res = run_predict(script_config, ckpt, tmp_path / "in", tmp_path / "out.csv", "topk=3")
    assert (res["images"], res["skipped"]) == (len(val), 1)
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    header, rows = read_rows(tmp_path / "out.csv")
    assert header == ["path", "label1", "prob1", "label2", "prob2", "label3", "prob3"]
    assert sorted(rows) == sorted(map(str, files))
    for i, file in enumerate(files):
        check_row(rows[str(file)], *expected_topk(model, val[i][0], FASHION_MNIST_CLASSES, 3))


@pytest.mark.parametrize("classes,names", [
    (["cat", "dog"], ["cat", "dog"]),
    (["n01440764", "n01443537"], ["tench, Tinca tinca", "goldfish, Carassius auratus"]),  # ImageNet synsets
])
def test_imagefolder_class_names_and_eval_transform(tmp_path, script_config, classes, names):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    overrides = TINY_MODEL + ["data=imagefolder", f"data.root={tmp_path / 'data'}", "data.img_size=16",
                              "data.workers=0"]
    ckpt, cfg, model = write_checkpoint(tmp_path / "best.pt", overrides)
    _, val, _ = build_datasets(cfg.data)
    run_predict(script_config, ckpt, f"{tmp_path / 'data'}/val/*/*.png", tmp_path / "out.csv", "topk=2")
    _, rows = read_rows(tmp_path / "out.csv")
    assert len(rows) == len(val.samples)
    for i, (path, _) in enumerate(val.samples):
        check_row(rows[path], *expected_topk(model, val[i][0], dict(enumerate(names)), 2))


def test_face_model_writes_embeddings_and_paths(tmp_path, script_config):
    overrides = ["task=face", "data=orl", "model=face_mobilenetv2_x0_1", "data.img_size=32"]
    ckpt, cfg, model = write_checkpoint(tmp_path / "best.pt", overrides)
    _, pairsets, _ = build_datasets(cfg.data)
    faces = pairsets[0].images
    (tmp_path / "in").mkdir()
    files = [tmp_path / "in" / f"{i}.png" for i in range(3)]
    for i, file in enumerate(files):  # held-out ORL faces (grey 112x92) as files
        Image.fromarray(faces.images[i]).save(file)
    res = run_predict(script_config, ckpt, tmp_path / "in", tmp_path / "emb" / "faces.csv")
    assert res["written"] == [str(tmp_path / "emb" / "faces.npy"), str(tmp_path / "emb" / "faces.txt")]
    assert (tmp_path / "emb" / "faces.txt").read_text().splitlines() == list(map(str, files))
    with torch.no_grad():
        expected = model.backbone(torch.stack([faces[i][0] for i in range(3)]))
    np.testing.assert_allclose(np.load(tmp_path / "emb" / "faces.npy"), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_topk_beyond_the_classes_and_inputs_without_images(tmp_path, script_config):
    ckpt, _, _ = write_checkpoint(tmp_path / "best.pt", TINY_RUN)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=f"inputs={tmp_path / 'empty'}: no image files .* in the folder"):
        run_predict(script_config, ckpt, tmp_path / "empty", tmp_path / "out.csv")
    with pytest.raises(ConfigError, match=f"inputs={tmp_path}/\\*.jpg: no image files"):
        run_predict(script_config, ckpt, f"{tmp_path}/*.jpg", tmp_path / "out.csv")
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    with pytest.raises(ConfigError, match=r"topk=11 but the model has 10 classes; give 1 <= topk <= 10"):
        run_predict(script_config, ckpt, tmp_path / "one.png", tmp_path / "out.csv", "topk=11")


@pytest.mark.slow
def test_bad_input_is_one_line_without_traceback(tmp_path):
    ckpt, _, _ = write_checkpoint(tmp_path / "best.pt", TINY_RUN)
    (tmp_path / "empty").mkdir()
    proc = run_script("predict", [f"checkpoint={ckpt}", f"inputs={tmp_path / 'empty'}"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"predict.py: error: inputs={tmp_path / 'empty'}: no image files")
