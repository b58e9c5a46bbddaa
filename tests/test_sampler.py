import collections

import pytest

from data.sampler import EvalDistributedSampler, ResumableDistributedSampler


def _all_ranks(dataset_len, world_size, epoch=0, seed=0, shuffle=True):
    samplers = [
        ResumableDistributedSampler(dataset_len, world_size, r, shuffle, seed)
        for r in range(world_size)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize('dataset_len, world_size', [(10, 1), (12, 4), (10, 4), (3, 5)])
def test_every_index_once_per_epoch_across_ranks_with_padding(dataset_len, world_size):
    per_rank = _all_ranks(dataset_len, world_size, epoch=3)
    padded = -(-dataset_len // world_size) * world_size
    assert all(len(keys) == padded // world_size for keys in per_rank)
    assert all(epoch == 3 for keys in per_rank for epoch, _ in keys)
    counts = collections.Counter(index for keys in per_rank for _, index in keys)
    assert set(counts) == set(range(dataset_len))
    # padding repeats indices: exactly `padded - dataset_len` extra appearances
    assert sum(counts.values()) - dataset_len == padded - dataset_len


def test_all_ranks_share_one_permutation_that_changes_with_epoch_and_seed():
    ranks = _all_ranks(16, 4, epoch=1)
    interleaved = [ranks[i % 4][i // 4][1] for i in range(16)]
    single = [index for _, index in _all_ranks(16, 1, epoch=1)[0]]
    assert interleaved == single  # rank r holds positions r, r + 4, ... of the same order
    assert single != [index for _, index in _all_ranks(16, 1, epoch=2)[0]]
    assert single != [index for _, index in _all_ranks(16, 1, epoch=1, seed=1)[0]]
    assert [i for _, i in _all_ranks(16, 1, shuffle=False)[0]] == list(range(16))


def test_set_epoch_with_start_index_yields_the_tail_of_the_epoch():
    sampler = ResumableDistributedSampler(23, num_replicas=3, rank=1, seed=5)
    sampler.set_epoch(4)
    full = list(sampler)
    for start in (0, 1, 5, len(full)):
        sampler.set_epoch(4, start_index=start)
        assert len(sampler) == len(full) - start
        assert list(sampler) == full[start:]
    with pytest.raises(ValueError):
        sampler.set_epoch(4, start_index=len(full) + 1)


@pytest.mark.parametrize('dataset_len, world_size', [(10, 3), (7, 4), (2, 3), (9, 1)])
def test_eval_sampler_covers_every_index_exactly_once_with_uneven_shards(dataset_len, world_size):
    shards = [list(EvalDistributedSampler(dataset_len, world_size, r)) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(dataset_len))
    assert [len(s) for s in shards] == [
        len(EvalDistributedSampler(dataset_len, world_size, r)) for r in range(world_size)
    ]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
