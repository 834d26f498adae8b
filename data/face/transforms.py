"""Face image preprocessing shared by every face dataset: decode, fit to the backbone's square
input, normalise (default `Normalize(0.5, 0.5)`: [-1, 1], as TVConv and insightface), random flip.

Images are RGB (TVConv reads with cv2, i.e. BGR; for the grey ORL faces the order does not matter).
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..base import random_shift

FITS = ("pad", "resize")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image file (JPEG, PNG, ...) -> uint8 RGB array (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601, as PIL's convert("L")


def face_tensor(img: np.ndarray, img_size: int, fit: str = "pad", channels: int = 3,
                mean=(0.5,), std=(0.5,)) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) -> float (channels, img_size, img_size), `(x / 255 - mean) / std`
    (the defaults give TVConv's [-1, 1]).

    fit="pad": zero-pad the short side to a square (centred), then resize, so the face keeps its
    aspect ratio (ORL's 112x92 -> 112x112 -> 96x96; square images are only resized).
    fit="resize": stretch to the square. Grey images are repeated to 3 channels; colour images
    made grey with the luma weights when channels=1.
    """
    x = torch.from_numpy(np.ascontiguousarray(img))
    x = (x.unsqueeze(-1) if x.ndim == 2 else x).permute(2, 0, 1).float()
    if x.shape[0] != channels:
        x = x.expand(3, -1, -1) if channels == 3 else (x * _LUMA).sum(0, keepdim=True)
    if fit == "pad":
        h, w = x.shape[1:]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
    elif fit != "resize":
        raise ValueError(f"fit={fit!r}: choose one of {FITS}")
    if x.shape[1:] != (img_size, img_size):
        x = F.interpolate(x[None], size=(img_size, img_size), mode="bilinear", antialias=True,
                          align_corners=False)[0].clamp(0.0, 255.0)
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x / 255.0 - mean) / std


class FaceDataset(Dataset):
    """Base of the face datasets: subclasses give `__len__` and `load(i) -> (uint8 image, label)`;
    this class turns the image into the network input (`face_tensor`) and flips it horizontally
    with probability `hflip` (TVConv's only augmentation; 0 for evaluation sets). Stronger training
    augmentation for robustness ablations: a random shift of up to `crop_padding` pixels (zero-padded
    after normalisation, i.e. mid-grey) and `erase` (timm's RandomErasing, data/base.py `erasing`)."""

    def __init__(self, img_size: int = 96, fit: str = "pad", channels: int = 3, mean=(0.5,),
                 std=(0.5,), hflip: float = 0.0, crop_padding: int = 0, erase=None):
        if fit not in FITS:
            raise ValueError(f"fit={fit!r}: choose one of {FITS}")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: face images have 1 or 3 channels")
        self.img_size, self.fit, self.channels = img_size, fit, channels
        self.mean, self.std, self.hflip = tuple(mean), tuple(std), hflip
        self.crop_padding, self.erase = crop_padding, erase

    def load(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.load(index)
        x = face_tensor(img, self.img_size, self.fit, self.channels, self.mean, self.std)
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        x = random_shift(x, self.crop_padding)
        if self.erase is not None:
            x = self.erase(x)
        return x, label


class ArrayFaces(FaceDataset):
    """Faces held in memory: uint8 (N, H, W[, C]) images and their integer labels."""

    def __init__(self, images: np.ndarray, labels, **kwargs):
        super().__init__(**kwargs)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class EncodedFaces(FaceDataset):
    """Faces kept as encoded files (bytes), decoded on access: verification `.bin` images."""

    def __init__(self, blobs: list[bytes], labels=None, **kwargs):
        super().__init__(**kwargs)
        self.blobs = blobs
        self.labels = [-1] * len(blobs) if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.blobs)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return decode_image(self.blobs[index]), int(self.labels[index])


class FileFaces(FaceDataset):
    """Faces stored as image files on disk: an identity ImageFolder or the images of a pair list."""

    def __init__(self, paths: list[str], labels=None, **kwargs):
        super().__init__(**kwargs)
        self.paths = list(paths)
        self.labels = [-1] * len(self.paths) if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        with open(self.paths[index], "rb") as f:
            return decode_image(f.read()), int(self.labels[index])
