import torch

from engine.sampler import EpochBatches, SeededItems


def _indices(sampler):
    return [[i for i, _ in batch] for batch in sampler]


def test_order_is_a_function_of_seed_and_epoch():
    a = EpochBatches(50, 4, shuffle=True, drop_last=True, seed=3)
    b = EpochBatches(50, 4, shuffle=True, drop_last=True, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert _indices(a) == _indices(b)
    b.set_epoch(3)
    assert _indices(a) != _indices(b)
    assert len(a) == 12 and all(len(x) == 4 for x in _indices(a))


def test_resume_mid_epoch_continues_with_the_same_batches():
    s = EpochBatches(40, 5, shuffle=True, drop_last=True, seed=0)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start_batch=3)
    assert list(s) == full[3:] and len(s) == len(full) - 3


def test_ranks_split_each_global_batch():
    single = EpochBatches(64, 8, shuffle=True, drop_last=True, seed=1)
    ranks = [EpochBatches(64, 4, shuffle=True, drop_last=True, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(0)
    r0, r1 = list(ranks[0]), list(ranks[1])
    for g, a, b in zip(single, r0, r1):
        assert g == a + b  # same (index, item seed) pairs, split between the ranks


def test_eval_batches_cover_everything_once():
    ranks = [EpochBatches(23, 4, shuffle=False, drop_last=False, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = sorted(i for s in ranks for b in _indices(s) for i in b)
    assert seen == list(range(23))


def test_items_are_reproducible_and_do_not_touch_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i

    ds = SeededItems(Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[(1, 123)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, ds[(1, 123)]) and not torch.equal(a, ds[(1, 124)])


def test_too_small_dataset_names_the_fix():
    import pytest
    with pytest.raises(ValueError, match="data.batch_size"):
        EpochBatches(10, 8, shuffle=True, drop_last=True, seed=0, world_size=2)
