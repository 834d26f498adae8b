"""ImageNet-layout folders (`root/train/<class>/*`, `root/val/<class>/*`) with timm's transforms.

Train: RandomResizedCrop(scale, ratio) + hflip + RandAugment (`aa`) or colour jitter + random erasing (`reprob`,
`remode`, `recount`);
eval: resize to img_size / crop_pct and a center crop (timm's `create_transform`).
A file PIL cannot decode stops the run with an error naming it, unless `skip_corrupt`: then the next decodable
file in index order takes its place (deterministic) and the skip is logged with a running count.
"""
import logging
import os
from pathlib import Path

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets import ImageFolder

from .base import DataInfo, normalisation

log = logging.getLogger(__name__)
DEFAULT_SIZE = 224


class CorruptImageError(RuntimeError):
    """An image file that PIL cannot decode."""


class ImageFolderSet(ImageFolder):
    """torchvision's ImageFolder, with a class map that can be fixed (val uses train's) and corrupt-file handling."""

    def __init__(self, root, transform, channels, skip_corrupt=False, class_to_idx=None):
        self._fixed_classes = class_to_idx
        self.mode = "L" if channels == 1 else "RGB"
        self.skip_corrupt = skip_corrupt
        self.skipped = set()  # corrupt files met by this process
        super().__init__(root, transform=transform, allow_empty=class_to_idx is not None)

    def find_classes(self, directory):
        if self._fixed_classes is None:
            return super().find_classes(directory)
        extra = sorted({e.name for e in os.scandir(directory) if e.is_dir()} - set(self._fixed_classes))
        if extra:
            raise ValueError(f"{directory} has class folders that the training set lacks: {', '.join(extra)}")
        return sorted(self._fixed_classes, key=self._fixed_classes.get), self._fixed_classes

    def __getitem__(self, index):
        for step in range(len(self.samples)):
            path, target = self.samples[(index + step) % len(self.samples)]
            try:
                with open(path, "rb") as f:
                    image = Image.open(f).convert(self.mode)  # convert() decodes the whole file
            except (OSError, SyntaxError, ValueError) as err:  # what PIL raises on broken headers or data
                if not self.skip_corrupt:
                    raise CorruptImageError(f"cannot decode image file {path}: {err}\nRemove or replace the file, "
                                            "or set data.skip_corrupt=true to skip undecodable files.") from err
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning("skipped corrupt image %s (%s); %d corrupt file(s) skipped so far in %s (this process)",
                                path, err, len(self.skipped), self.root)
                continue
            return self.transform(image), target
        raise CorruptImageError(f"no image in {self.root} can be decoded")


def build_imagefolder(cfg):
    if not cfg.root:
        raise ValueError("data.name=imagefolder needs data.root: a folder with train/<class>/* and val/<class>/*")
    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} is not a folder; data.root must hold train/<class>/* and "
                                    "val/<class>/* (the ImageNet layout)")
    size = cfg.img_size or DEFAULT_SIZE
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if cfg.channels == 1:  # gray images: the channel average of ImageNet's statistics
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    mean, std = normalisation(cfg, mean, std)
    train_tf = create_transform(
        size, is_training=True, no_aug=not cfg.augment, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
        hflip=cfg.hflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa, interpolation=cfg.interpolation,
        mean=mean, std=std, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
    eval_tf = create_transform(
        size, is_training=False, crop_pct=cfg.crop_pct, mean=mean, std=std,
        interpolation="bilinear" if cfg.interpolation == "random" else cfg.interpolation)
    train = ImageFolderSet(root / "train", train_tf, cfg.channels, cfg.skip_corrupt)
    val = ImageFolderSet(root / "val", eval_tf, cfg.channels, cfg.skip_corrupt, class_to_idx=train.class_to_idx)
    if not val.samples:
        raise FileNotFoundError(f"{root / 'val'} holds no image files")
    return train, val, DataInfo(len(train.classes), cfg.channels, (size, size), mean, std)
