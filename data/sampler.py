"""Distributed samplers: a resumable training sampler and an exact (unpadded) evaluation sampler;
the window sampler for shards and `shard_starts`, where each shard's samples begin."""

import numpy as np
import torch

from .seeding import sample_seed


def shard_starts(shard_lengths):
    """The dataset index of each shard's first sample when shards of `shard_lengths` samples
    follow each other (int64 array: the lengths summed before each shard)."""
    lengths = np.asarray(shard_lengths, dtype=np.int64)
    return np.cumsum(lengths) - lengths


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """DistributedSampler that can start mid-epoch and tells the dataset the epoch.

    Each epoch's order is a permutation seeded by (seed, epoch), the same on every rank, padded by
    repetition to a multiple of `num_replicas`; rank r takes positions r, r + num_replicas, ...
    So after k samples per rank, the first k * num_replicas positions are consumed whatever the
    world size, and a resume from `start_sample` (global positions already trained, written by a
    run of any world size) continues with exactly the positions after them: the rest is padded by
    repetition to a multiple of `num_replicas` and dealt out in the same way.
    Yields ``(epoch, index)`` so the dataset can seed each sample by (seed, epoch, index) even in
    persistent workers, which never see `set_epoch`.
    """

    def __init__(self, dataset_len, num_replicas=1, rank=0, shuffle=True, seed=0):
        if dataset_len < 1:
            raise ValueError(f'dataset_len must be positive, got {dataset_len}.')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} must lie in [0, num_replicas {num_replicas}).')
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.num_samples = -(-dataset_len // num_replicas)  # per rank, per epoch (with padding)
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.start_sample = 0, 0

    def set_epoch(self, epoch, start_index=0, start_sample=None):
        """Iterate over `epoch`, skipping the positions a resumed run already trained in it:
        `start_sample` global positions (over all ranks), or `start_index` samples per rank of
        this world size (the same as start_sample = start_index * num_replicas)."""
        start_sample = start_index * self.num_replicas if start_sample is None else start_sample
        if not 0 <= start_sample <= self.total_size:
            raise ValueError(
                f'start_sample {start_sample} must lie in [0, {self.total_size}] (the samples of '
                f'an epoch over {self.num_replicas} ranks).'
            )
        self.epoch, self.start_sample = epoch, start_sample

    def _permutation(self):
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0, 'shuffle'))
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    @staticmethod
    def _padded(indices, size):
        """`indices` repeated from its start until it has `size` entries (a loop: the padding may
        exceed the list)."""
        while len(indices) < size:
            indices = indices + indices[: size - len(indices)]
        return indices

    def epoch_indices(self):
        """This rank's index sequence for the current epoch, from `start_sample` on."""
        indices = self._padded(self._permutation(), self.total_size)[self.start_sample :]
        rest = -(-len(indices) // self.num_replicas) * self.num_replicas
        return self._padded(indices, rest)[self.rank :: self.num_replicas] if indices else []

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, index) for index in self.epoch_indices()])

    def __len__(self):
        return -(-(self.total_size - self.start_sample) // self.num_replicas)


class EvalDistributedSampler(torch.utils.data.Sampler):
    """Contiguous, unpadded shards: rank r gets one block of indices, the first (len % replicas)
    ranks one more than the rest, so a distributed evaluation counts every sample exactly once."""

    def __init__(self, dataset_len, num_replicas=1, rank=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} must lie in [0, num_replicas {num_replicas}).')
        base, extra = divmod(dataset_len, num_replicas)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (rank < extra)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


class ShardWindowSampler(ResumableDistributedSampler):
    """ResumableDistributedSampler whose epoch order reads few shards at a time (DATA.SHARD_SHUFFLE
    window): the shards are shuffled, cut into windows of `window` consecutive shards, and the
    samples of each window shuffled among themselves; windows follow each other. Every sample
    comes once per epoch, the order is a pure function of (seed, epoch), and resume and the
    dealing out to ranks are those of the base class (the ranks read the same window at a time).
    `shard_lengths`: the samples of each shard, in dataset order."""

    def __init__(self, shard_lengths, window, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(int(sum(shard_lengths)), num_replicas, rank, shuffle, seed)
        if window < 1:
            raise ValueError(f'window must be at least 1 shard, got {window}.')
        self.shard_lengths, self.window = list(shard_lengths), window
        self.shard_starts = shard_starts(self.shard_lengths).tolist()

    def _permutation(self):
        if not self.shuffle:
            return list(range(self.dataset_len))
        shard_order = torch.randperm(
            len(self.shard_lengths),
            generator=torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, 0, 'shard-order')
            ),
        ).tolist()
        order = []
        for first in range(0, len(shard_order), self.window):
            members = torch.cat(
                [
                    torch.arange(self.shard_lengths[s], dtype=torch.int64) + self.shard_starts[s]
                    for s in shard_order[first : first + self.window]
                ]
            )
            generator = torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, first, 'shard-window')
            )
            order += members[torch.randperm(len(members), generator=generator)].tolist()
        return order
