import collections

import pytest

from data.sampler import (
    EvalDistributedSampler,
    ResumableDistributedSampler,
    ShardWindowSampler,
    shard_starts,
)


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


SHARD_LENGTHS = [5, 3, 6, 4, 5, 2, 6]  # 31 samples in 7 shards


def _window_order(epoch=0, seed=0, window=2, world_size=1, rank=0, start_sample=0):
    sampler = ShardWindowSampler(SHARD_LENGTHS, window, world_size, rank, True, seed)
    sampler.set_epoch(epoch, start_sample=start_sample)
    return [index for _, index in sampler]


def _shard_of(index):
    starts = [sum(SHARD_LENGTHS[:s]) for s in range(len(SHARD_LENGTHS))]
    return max(s for s, start in enumerate(starts) if start <= index)


def test_shard_starts_are_the_lengths_summed_before_each_shard_empty_ones_too():
    assert shard_starts([3, 0, 2, 4]).tolist() == [0, 3, 3, 5]
    assert shard_starts([]).tolist() == []
    assert ShardWindowSampler([3, 0, 2], window=1).shard_starts == [0, 3, 3]


def test_window_order_covers_every_sample_once_reading_few_shards_at_a_time():
    order = _window_order(epoch=3, window=2)
    assert sorted(order) == list(range(sum(SHARD_LENGTHS)))
    # Consecutive runs of the order come from at most `window` shards: the shards of one window
    # are read together, then the next window's.
    shards = [_shard_of(i) for i in order]
    windows, current = [], set()
    for shard in shards:
        if shard not in current and len(current) == 2:
            windows.append(current)
            current = set()
        current.add(shard)
    windows.append(current)
    assert len(windows) == 4 and set().union(*windows) == set(range(7))
    assert all(not a & b for a in windows for b in windows if a is not b)  # each shard once


def test_window_order_is_a_pure_function_of_seed_and_epoch():
    assert _window_order(epoch=1) == _window_order(epoch=1)
    assert _window_order(epoch=1) != _window_order(epoch=2)
    assert _window_order(epoch=1) != _window_order(epoch=1, seed=1)
    assert _window_order(window=100) != list(range(31))  # one window: a plain shuffle
    unshuffled = ShardWindowSampler(SHARD_LENGTHS, 2, shuffle=False)
    assert [i for _, i in unshuffled] == list(range(31))


def test_window_order_resumes_mid_epoch_with_the_same_remaining_order_on_any_world_size():
    full = _window_order(epoch=2, window=3)
    for start in (0, 7, 30):
        assert _window_order(epoch=2, window=3, start_sample=start) == full[start:]
    # Two ranks after 10 global samples: together they continue the single-rank order.
    ranks = [
        _window_order(epoch=2, window=3, world_size=2, rank=r, start_sample=10) for r in (0, 1)
    ]
    interleaved = [ranks[i % 2][i // 2] for i in range(len(ranks[0]) * 2)]
    assert interleaved[: 31 - 10] == full[10:]
