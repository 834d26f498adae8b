"""Synthetic images for fast tests and dry runs at any resolution: no files, seeded, learnable.

Class k is a fixed smooth random pattern P_k (a 4x4 Gaussian grid upsampled to the image size); an item is
(P_y + 0.5 * noise) / sqrt(1.25), so pixels are about N(0, 1), and the class is visible both in the layout and in
the per-channel means that survive global pooling. Items are generated on access from (seed, split, index), so
a 224 px set costs no memory and every worker and every run sees the same images.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .base import DataInfo, normalisation

NOISE = 0.5
DEFAULT_SIZE = 32
DEFAULT_CLASSES = 10


class SyntheticImages(Dataset):
    def __init__(self, length, patterns, seed, split, mean, std):
        self.length, self.patterns, self.seed, self.split = length, patterns, seed, split
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic images")
        label = index % len(self.patterns)  # balanced classes
        state = np.random.SeedSequence([self.seed, self.split, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        pattern = self.patterns[label]
        x = (pattern + NOISE * torch.randn(pattern.shape, generator=generator)) / math.sqrt(1 + NOISE ** 2)
        return (x - self.mean) / self.std, label


def build_synthetic(cfg):
    """cfg.train_size / cfg.val_size images of cfg.channels x img_size^2 in cfg.num_classes classes."""
    size = cfg.img_size or DEFAULT_SIZE
    num_classes = cfg.num_classes or DEFAULT_CLASSES
    generator = torch.Generator().manual_seed(cfg.seed)
    coarse = torch.randn(num_classes, cfg.channels, 4, 4, generator=generator)
    patterns = F.interpolate(coarse, (size, size), mode="bicubic", align_corners=False)
    patterns = (patterns - patterns.mean()) / patterns.std()
    mean, std = normalisation(cfg, (0.0,), (1.0,))
    train = SyntheticImages(cfg.train_size, patterns, cfg.seed, 0, mean, std)
    val = SyntheticImages(cfg.val_size, patterns, cfg.seed, 1, mean, std)
    return train, val, DataInfo(num_classes, cfg.channels, (size, size), mean, std)
