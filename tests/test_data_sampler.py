"""CaptionGroupedBatchSampler: no repeated image in a batch, determinism, distributed sharding, resume."""

from __future__ import annotations

import itertools

import pytest

from clipcraft.data import CaptionGroupedBatchSampler
from clipcraft.errors import ClipcraftError

COUNTS = [5, 1, 3, 2, 5, 4] * 17 + [2]  # 103 images with 1 to 5 captions


def _all(sampler: CaptionGroupedBatchSampler) -> list[list[tuple[int, int]]]:
    return list(sampler)


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_never_repeat_an_image_and_captions_are_valid(drop_last):
    sampler = CaptionGroupedBatchSampler(COUNTS, batch_size=8, seed=3, drop_last=drop_last)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = _all(sampler)
        assert len(batches) == len(sampler) == sampler.batches_per_epoch
        for batch in batches:
            images = [i for i, _ in batch]
            assert len(set(images)) == len(images)
            assert all(0 <= c < COUNTS[i] for i, c in batch)
        seen = [i for batch in batches for i, _ in batch]
        assert len(seen) == len(set(seen))  # each image at most once per epoch
        assert len(seen) == (96 if drop_last else 103)


def test_same_seed_and_epoch_give_the_same_order_and_epochs_differ():
    a = CaptionGroupedBatchSampler(COUNTS, batch_size=8, seed=11)
    b = CaptionGroupedBatchSampler(COUNTS, batch_size=8, seed=11)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _all(a) == _all(b)
    assert _all(a) == _all(a)  # iterating twice repeats the epoch
    b.set_epoch(3)
    assert _all(a) != _all(b)
    c = CaptionGroupedBatchSampler(COUNTS, batch_size=8, seed=12)
    c.set_epoch(2)
    assert _all(a) != _all(c)


def test_captions_vary_across_epochs():
    sampler = CaptionGroupedBatchSampler([5] * 40, batch_size=4, seed=0)
    used = set()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        used |= {pair for batch in sampler for pair in batch if pair[0] == 0}
    assert {c for _, c in used} == set(range(5))  # image 0 used every one of its captions


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_are_disjoint_equal_and_cover_the_epoch(drop_last):
    world = 3
    samplers = [
        CaptionGroupedBatchSampler(
            COUNTS, batch_size=4, seed=5, num_replicas=world, rank=r, drop_last=drop_last
        )
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(1)
    per_rank = [[pair for batch in s for pair in batch] for s in samplers]
    assert len({len(p) for p in per_rank}) == 1  # equal length
    assert len({len(s) for s in samplers}) == 1  # same number of batches
    images = [{i for i, _ in p} for p in per_rank]
    if drop_last:
        for x, y in itertools.combinations(images, 2):
            assert not x & y
        assert sum(map(len, images)) == (103 // 12) * 12
    else:
        assert set().union(*images) == set(range(len(COUNTS)))  # padding repeats, but everything is covered
        assert sum(map(len, per_rank)) == 105  # 103 padded to a multiple of 3
    # all ranks agree on the caption drawn for an image
    chosen: dict[int, int] = {}
    for pair in itertools.chain.from_iterable(per_rank):
        assert chosen.setdefault(pair[0], pair[1]) == pair[1]
    # one global step (batch s of every rank) never repeats an image
    for step in zip(*[list(s) for s in samplers], strict=True):
        ids = [i for batch in step for i, _ in batch]
        assert len(ids) == len(set(ids))


def test_single_rank_matches_the_union_of_ranks_order():
    one = CaptionGroupedBatchSampler(COUNTS, batch_size=6, seed=9, num_replicas=1, rank=0)
    two = [CaptionGroupedBatchSampler(COUNTS, batch_size=3, seed=9, num_replicas=2, rank=r) for r in range(2)]
    order, captions = one.epoch_plan()
    for r, s in enumerate(two):
        mine, caps = s.epoch_plan()
        assert list(mine) == list(order[r::2][: len(mine)])
        assert list(caps) == list(captions)


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    sampler = CaptionGroupedBatchSampler(COUNTS, batch_size=8, seed=4, num_replicas=2, rank=1)
    sampler.set_epoch(7)
    full = _all(sampler)
    sampler.set_epoch(7, start_batch=2)
    assert len(sampler) == len(full) - 2
    assert _all(sampler) == full[2:]
    sampler.set_epoch(7, start_batch=len(full))
    assert _all(sampler) == []
    sampler.set_epoch(8)  # a new epoch starts from its first batch again
    assert len(_all(sampler)) == len(full)
    with pytest.raises(ClipcraftError):
        sampler.set_epoch(7, start_batch=len(full) + 1)


def test_accepts_a_dataset_and_rejects_bad_arguments():
    class Fake:
        def caption_counts(self):
            return [1, 2, 3, 4]

    assert CaptionGroupedBatchSampler(Fake(), batch_size=2).num_images == 4
    with pytest.raises(ClipcraftError, match="global batch"):
        CaptionGroupedBatchSampler([1] * 5, batch_size=4, num_replicas=2, rank=0)
    with pytest.raises(ClipcraftError, match="no caption"):
        CaptionGroupedBatchSampler([1, 0, 2], batch_size=1)
    with pytest.raises(ClipcraftError, match="rank"):
        CaptionGroupedBatchSampler([1] * 8, batch_size=1, num_replicas=2, rank=2)


def test_without_shuffle_the_order_is_the_index_order():
    sampler = CaptionGroupedBatchSampler([2] * 10, batch_size=5, shuffle=False)
    assert [[i for i, _ in b] for b in sampler] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
