"""Config -> face datasets: `FACE_DATASETS[cfg.name](cfg) -> (train set, [PairSet, ...], DataInfo)`.

Keys beyond the common `DataConfig` ones: `num_test`, `fold` (ORL's identity split, with `seed`),
`val_sets` (evaluation sets: a path to a `.bin` file or to a `pairs.txt` list; a bare name such as
`lfw` means `<root>/lfw.bin`, insightface's layout) and `pairs_root` (the images folder of the
`pairs.txt` lists; default: the list's folder).
"""
from __future__ import annotations

import os

from ..base import DataInfo, erasing, normalisation
from .orl import orl_data
from .pairs import PairSet, identity_folder, lfw_pairset
from .recordio import RecordFaces
from .verification_bin import bin_pairset

DEFAULT_SIZE = 96  # TVConv's face input


def _face_kwargs(cfg) -> dict:
    mean, std = normalisation(cfg, (0.5,), (0.5,))
    return dict(img_size=cfg.img_size or DEFAULT_SIZE, channels=cfg.channels, mean=mean, std=std)


def _info(num_classes: int, kw: dict) -> DataInfo:
    return DataInfo(num_classes, kw["channels"], (kw["img_size"],) * 2, kw["mean"], kw["std"])


def val_pairsets(cfg, kw: dict, required: bool = False) -> list[PairSet]:
    """The evaluation sets named by `cfg.val_sets`; `required`: the dataset has no held-out set of its own, so an
    empty list fails here, at start-up, rather than at the first evaluation."""
    if required and not cfg.val_sets:
        raise ValueError(f"data.name={cfg.name} has no evaluation sets: set data.val_sets, e.g. "
                         "data.val_sets=[lfw,cfp_fp,agedb_30] (<data.root>/<name>.bin) or a pairs.txt path")
    sets = []
    for entry in cfg.val_sets:
        path = entry
        if not os.path.splitext(entry)[1] and os.sep not in entry:
            if not cfg.root:
                raise ValueError(f"data.val_sets entry {entry!r} means <data.root>/{entry}.bin, but data.root is unset")
            path = os.path.join(cfg.root, entry + ".bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"evaluation set {path} not found (data.val_sets entry {entry!r})")
        if path.endswith(".bin"):
            sets.append(bin_pairset(path, **kw))
        else:
            name = os.path.splitext(os.path.basename(path))[0]
            sets.append(lfw_pairset(path, cfg.pairs_root or os.path.dirname(path), name=name, **kw))
    return sets


def _train_aug(cfg) -> dict:
    """Training-set augmentation options of FaceDataset (evaluation sets get none)."""
    if not cfg.augment:
        return dict(hflip=0.0)
    return dict(hflip=cfg.hflip, crop_padding=cfg.crop_padding, erase=erasing(cfg))


def build_orl(cfg):
    kw = _face_kwargs(cfg)
    train, num_classes, val = orl_data(cfg.root, cfg.num_test, cfg.seed, cfg.fold, **kw, **_train_aug(cfg))
    return train, [val, *val_pairsets(cfg, kw)], _info(num_classes, kw)


def build_face_rec(cfg):
    if not cfg.root:
        raise ValueError("data.name=face_rec needs data.root: the folder with train.rec and train.idx")
    kw = _face_kwargs(cfg)
    val = val_pairsets(cfg, kw, required=True)
    train = RecordFaces(cfg.root, **kw, **_train_aug(cfg))
    return train, val, _info(train.num_classes, kw)


def build_face_folder(cfg):
    if not cfg.root:
        raise ValueError("data.name=face_folder needs data.root: a folder with one sub-folder per identity")
    kw = _face_kwargs(cfg)
    val = val_pairsets(cfg, kw, required=True)
    train = identity_folder(cfg.root, **kw, **_train_aug(cfg))
    return train, val, _info(len(train.classes), kw)


FACE_DATASETS = {"orl": build_orl, "face_rec": build_face_rec, "face_folder": build_face_folder}
