"""Seeded, resumable, rank-sharded batches.

The data order of an epoch is a pure function of (seed, epoch), so a run resumed in the middle of
an epoch continues with exactly the batches it would have seen. Every item also carries its own
seed, derived from (seed, epoch, index), under which its random augmentation runs: the images do
not depend on the number of workers, on the rank layout, or on where the run was resumed.

Global batch i is the slice [i·B·W, (i+1)·B·W) of the permutation and rank r takes its r-th part,
so W processes with batch B see exactly the samples one process with batch B·W sees.
"""
from __future__ import annotations

import math
import random

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * _MIX + index) % (2 ** 63)


class EpochBatches(Sampler):
    """Yields this rank's batches of `(index, item_seed)` pairs; `set_epoch(e, start_batch)` moves it."""

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world_size: int = 1, limit: int | None = None):
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.limit = seed, rank, world_size, limit
        self.epoch, self.start_batch = 0, 0
        global_batch = batch_size * world_size
        if drop_last and size < global_batch:
            raise ValueError(f"the dataset has {size} samples, fewer than one global batch of {global_batch} "
                             f"(batch {batch_size} x {world_size} processes); lower data.batch_size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        gb = self.batch_size * self.world_size
        n = self.size // gb if self.drop_last else math.ceil(self.size / gb)
        return min(n, self.limit) if self.limit else n

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        gb, b = self.batch_size * self.world_size, self.batch_size
        for i in range(self.start_batch, self.num_batches()):
            mine = order[i * gb:(i + 1) * gb][self.rank * b:(self.rank + 1) * b]
            if mine:
                yield [(j, item_seed(self.seed, self.epoch, j)) for j in mine]


class SeededItems(Dataset):
    """Wraps a dataset so item `(index, seed)` is produced under its own RNG seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            item = self.dataset[index]
        random.setstate(py_state)
        return item
