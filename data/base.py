"""What every dataset builder shares: the description it returns, normalisation, seeded subsets."""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing


@dataclass(frozen=True)
class DataInfo:
    """What the model and the engine need to know about a dataset."""
    num_classes: int
    in_chans: int
    input_size: Tuple[int, int]  # (height, width) of the tensors the datasets return
    mean: Tuple[float, ...]  # per channel, applied to [0, 1] pixels
    std: Tuple[float, ...]


def normalisation(cfg, default_mean, default_std):
    """Per-channel (mean, std) from the config, else the dataset's defaults; one value is repeated per channel."""
    stats = []
    for key, default in (("mean", default_mean), ("std", default_std)):
        values = tuple(float(v) for v in (getattr(cfg, key) or default))
        if len(values) == 1:
            values *= cfg.channels
        if len(values) != cfg.channels:
            raise ValueError(f"data.{key} has {len(values)} values for data.channels={cfg.channels}; "
                             "give one value or one per channel")
        stats.append(values)
    if any(s <= 0 for s in stats[1]):
        raise ValueError(f"data.std must be positive, got {list(stats[1])}")
    return stats[0], stats[1]


def subset_indices(n, size, seed):
    """A seeded random choice of `size` of `n` indices, in increasing order (the same for every run with `seed`)."""
    if not 0 < size <= n:
        raise ValueError(f"data.train_subset={size} must be between 1 and the training-set size {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def erasing(cfg):
    """timm's RandomErasing on normalised CHW tensors from `data.reprob/remode/recount`, or None when off."""
    if not (cfg.augment and cfg.reprob > 0):
        return None
    return RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device="cpu")


def random_shift(x, padding: int):
    """Random crop of `x` (..., H, W) zero-padded by `padding` on each side back to (H, W); the RNG is torch's
    global one, which the engine seeds per item (engine/sampler.py), so runs repeat."""
    if padding <= 0:
        return x
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    h, w = x.shape[-2:]
    return F.pad(x, (padding,) * 4)[..., top:top + h, left:left + w]
