"""ImageNet-layout folders (`root/train/<class>/*`, `root/val/<class>/*`) with timm's transforms.

Train: RandomResizedCrop(scale, ratio) + hflip + RandAugment (`aa`) or colour jitter + random erasing (`reprob`,
`remode`, `recount`);
eval: resize to img_size / crop_pct and a center crop (timm's `create_transform`).
A file PIL cannot decode (corrupt, truncated, not an image) stops the run with a one-line error naming it; with
`data.on_bad_image=skip` the next decodable file in index order takes its place (deterministic) and the skip is logged
with a running count.
"""
import logging
import os
from pathlib import Path

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets import ImageFolder

from dynconv.errors import UserError

from .base import DataInfo, normalisation
from .config import MissingDataError

log = logging.getLogger(__name__)
DEFAULT_SIZE = 224


class CorruptImageError(UserError, RuntimeError):
    """An image file that PIL cannot decode (one line naming it)."""

    def __init__(self, message: str):
        # from a DataLoader worker it comes back as "Caught ... Original Traceback ... <class name>: <message>"
        super().__init__(message.rstrip().rpartition(f"{type(self).__name__}: ")[2] or message)


class ImageFolderSet(ImageFolder):
    """torchvision's ImageFolder, with a class map that can be fixed (val uses train's) and corrupt-file handling."""

    def __init__(self, root, transform, channels, skip_bad=False, class_to_idx=None):
        self._fixed_classes = class_to_idx
        self.mode = "L" if channels == 1 else "RGB"
        self.skip_bad = skip_bad
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
                if not self.skip_bad:
                    raise CorruptImageError(f"cannot decode image file {path} ({err}); remove or replace it, or set "
                                            "data.on_bad_image=skip to skip undecodable files") from err
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning("skipped corrupt image %s (%s); %d corrupt file(s) skipped so far in %s (this process)",
                                path, err, len(self.skipped), self.root)
                continue
            return self.transform(image), target
        raise CorruptImageError(f"no image in {self.root} can be decoded")


def build_imagefolder(cfg):
    if not cfg.root:
        raise MissingDataError("data.name=imagefolder needs data.root: a folder with train/<class>/* and "
                               "val/<class>/*")
    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise MissingDataError(f"{root / split} is not a folder; data.root must hold train/<class>/* and "
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
    skip_bad = cfg.on_bad_image == "skip"
    train = ImageFolderSet(root / "train", train_tf, cfg.channels, skip_bad)
    val = ImageFolderSet(root / "val", eval_tf, cfg.channels, skip_bad, class_to_idx=train.class_to_idx)
    if not val.samples:
        raise MissingDataError(f"{root / 'val'} holds no image files")
    return train, val, DataInfo(len(train.classes), cfg.channels, (size, size), mean, std)
