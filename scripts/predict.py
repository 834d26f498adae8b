"""Classify image files with a checkpoint, or embed them with a face model (timm's inference.py).

    python scripts/predict.py checkpoint=outputs/train/<run>/checkpoints/best.pt inputs=photos/ topk=5 output=out.csv
    python scripts/predict.py checkpoint=<run>/checkpoints/best.pt inputs='shots/*.png' use_ema=true
    python scripts/predict.py checkpoint=rednet50.pth model=rednet50 data=imagefolder data.root=/data/imagenet \
        inputs=cat.jpg

Each image gets the evaluation transforms of the checkpoint's data config and is one CSV row: its path, then the
top-k class names with their probabilities. Class names come from the dataset (Fashion-MNIST's names, the
ImageFolder's folders, ImageNet synsets through timm's ImageNetInfo). A face model writes the embeddings to
`<output>.npy` (one row per image) and the image paths to `<output>.txt` (same order). An unreadable image is
named and skipped, and counted at the end. The config is composed as in scripts/validate.py; the checkpoint's
dataset must be readable (`data.root=` where it moved), as its class names and transforms come from it.
"""
from __future__ import annotations

import csv
import glob
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, register_configs, validate as validate_config  # noqa: E402
from engine.inference import Checkpoint, Loaded, PredictConfig  # noqa: E402
from engine.verification import embed  # noqa: E402

log = logging.getLogger("predict")


def image_files(inputs: str) -> list[Path]:
    """The images `inputs` names: one file, a folder's image files (recursively, sorted), or a glob's matches."""
    path = Path(inputs)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        where = f"the folder {inputs}"
    else:
        files = sorted(Path(p) for p in glob.glob(inputs, recursive=True) if Path(p).is_file())
        where = f"{inputs} (neither a file nor a folder, so read as a glob)"
    if not files:
        raise ConfigError(f"inputs={inputs}: no image files ({', '.join(IMG_EXTENSIONS)}) in {where}; give an "
                          "image file, a folder of images or a glob such as 'photos/*.jpg'")
    return files


def decoded(files: list[Path], transform):
    """(path, network input) of each file PIL can decode; an unreadable one is named in the log and skipped."""
    for path in files:
        try:
            with Image.open(path) as im:
                x = transform(im)
        except (OSError, SyntaxError, ValueError) as err:  # what PIL raises on broken headers or data
            log.warning("skipped %s: not a readable image (%s)", path, err)
            continue
        yield path, x


def batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(cfg: DictConfig, overrides: list[str], compose) -> dict:
    """Run `cfg.checkpoint` on `cfg.inputs`; write `cfg.output`; returns what was written and the counts."""
    ckpt = Checkpoint(cfg.checkpoint)
    run_cfg = ckpt.config(cfg, overrides, compose)
    validate_config(run_cfg)
    files = image_files(cfg.inputs)
    loaded = Loaded(run_cfg, ckpt, cfg.use_ema)
    names = None if loaded.is_face else loaded.class_names()
    if names is not None and not 0 < cfg.topk <= len(names):
        raise ConfigError(f"topk={cfg.topk} but the model has {len(names)} classes; give 1 <= topk <= {len(names)}")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, rows, embeddings = [], [], []
    bar = tqdm(files, desc="predict", unit="img", dynamic_ncols=True, leave=False)
    with torch.no_grad(), loaded.autocast():
        for batch in batches(decoded(bar, loaded.image_transform()), run_cfg.data.batch_size):
            x = torch.stack([x for _, x in batch]).to(loaded.device)
            if loaded.is_face:
                embeddings.append(embed(loaded.model.backbone, TensorDataset(x, torch.zeros(len(x))),
                                        batch_size=len(x), flip=loaded.task.flip_test, device=loaded.device))
            else:
                prob, idx = loaded.model(x).float().softmax(1).topk(cfg.topk, dim=1)
                rows += [[str(path)] + [v for j, p in zip(i, pr) for v in (names[j], f"{p:.6f}")]
                         for (path, _), i, pr in zip(batch, idx.tolist(), prob.tolist())]
            done += [path for path, _ in batch]
    if loaded.is_face:
        emb = torch.cat(embeddings).numpy() if embeddings else np.zeros((0, 0), np.float32)
        np.save(out.with_suffix(".npy"), emb)
        out.with_suffix(".txt").write_text("".join(f"{p}\n" for p in done))
        written = [out.with_suffix(".npy"), out.with_suffix(".txt")]
    else:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path"] + [c for k in range(1, cfg.topk + 1) for c in (f"label{k}", f"prob{k}")])
            writer.writerows(rows)
        written = [out]
    return {"written": [str(p) for p in written], "images": len(done), "skipped": len(files) - len(done)}


def _compose(overrides: list[str]) -> DictConfig:
    return hydra.compose(config_name="predict", overrides=overrides)


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        result = predict(cfg, list(HydraConfig.get().overrides.task), _compose)
    except MissingMandatoryValue as e:
        sys.exit(f"predict.py: error: {e.full_key}= is required: python scripts/predict.py checkpoint=<best.pt or last.pt> inputs=<image, folder or glob>")
    except (ConfigError, OSError, ValueError) as e:
        sys.exit(f"predict.py: error: {e}")
    print(f"{result['images']} image(s) predicted, {result['skipped']} unreadable skipped; wrote "
          f"{' and '.join(result['written'])}", flush=True)


if __name__ == "__main__":
    register_configs(PredictConfig)
    main()
