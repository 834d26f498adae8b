"""Verification pair sets, LFW's `pairs.txt` lists, and the identity ImageFolder training set."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .transforms import FaceDataset, FileFaces


@dataclass
class PairSet:
    """One evaluation set: pair p compares `images[pairs[p, 0]]` with `images[pairs[p, 1]]`, and
    `issame[p]` says whether both show the same identity. Each image is embedded once, however
    many pairs use it. Pair order matters: the LFW protocol's 10 folds are contiguous blocks."""
    name: str
    images: FaceDataset
    pairs: torch.Tensor   # (P, 2) int64
    issame: torch.Tensor  # (P,) bool

    def __post_init__(self):
        self.pairs = torch.as_tensor(self.pairs, dtype=torch.int64)
        self.issame = torch.as_tensor(self.issame, dtype=torch.bool)
        if self.pairs.ndim != 2 or self.pairs.shape[1] != 2 or len(self.pairs) != len(self.issame):
            raise ValueError(f"{self.name}: pairs must be (P, 2) with P flags, got "
                             f"{tuple(self.pairs.shape)} and {len(self.issame)} flags")
        if len(self.pairs) and (self.pairs.min() < 0 or self.pairs.max() >= len(self.images)):
            raise ValueError(f"{self.name}: pair indices outside the {len(self.images)} images")


def read_lfw_pairs(pairs_txt: str, root: str, ext: str = "jpg") -> tuple[list[tuple[str, str]], list[bool]]:
    """Parse LFW's `pairs.txt`: `name i j` (same person) or `name1 i name2 j` (different people),
    with image i of `name` at `root/name/name_{i:04d}.ext`. Header lines (`10 300`, `1100`) are
    skipped. Every listed file must exist."""
    def path(name: str, num: str) -> str:
        return os.path.join(root, name, f"{name}_{int(num):04d}.{ext}")

    pairs, issame = [], []
    with open(pairs_txt) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or (lineno == 1 and len(fields) <= 2 and all(x.isdigit() for x in fields)):
                continue
            if len(fields) == 3:
                pairs.append((path(fields[0], fields[1]), path(fields[0], fields[2])))
                issame.append(True)
            elif len(fields) == 4:
                pairs.append((path(fields[0], fields[1]), path(fields[2], fields[3])))
                issame.append(False)
            else:
                raise ValueError(f"{pairs_txt}:{lineno}: expected `name i j` or `name1 i name2 j`, "
                                 f"got {line.strip()!r}")
    missing = sorted({p for pair in pairs for p in pair if not os.path.isfile(p)})
    if missing:
        raise FileNotFoundError(f"{pairs_txt}: {len(missing)} listed images are missing under {root}, "
                                f"e.g. {missing[0]}; point the images root at the aligned LFW folder")
    return pairs, issame


def lfw_pairset(pairs_txt: str, root: str, name: str = "lfw", ext: str = "jpg", **face_kwargs) -> PairSet:
    """A `PairSet` from a `pairs.txt` list over a folder of identities (each image loaded once)."""
    pairs, issame = read_lfw_pairs(pairs_txt, root, ext)
    paths = sorted({p for pair in pairs for p in pair})
    index = {p: i for i, p in enumerate(paths)}
    return PairSet(name, FileFaces(paths, **face_kwargs),
                   [(index[a], index[b]) for a, b in pairs], issame)


def identity_folder(root: str, **face_kwargs) -> FileFaces:
    """Training set from an ImageFolder of identities (`root/<identity>/<image>`, as insightface's
    `prepare_custom_dataset`); label = index of the identity folder in sorted order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"identity folder {root!r} does not exist")
    classes, class_to_idx = find_classes(root)
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    ds = FileFaces([p for p, _ in samples], [y for _, y in samples], **face_kwargs)
    ds.classes = classes
    return ds
