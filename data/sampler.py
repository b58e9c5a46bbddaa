"""Distributed samplers: a resumable training sampler and an exact (unpadded) evaluation sampler."""

import torch

from .seeding import sample_seed


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """DistributedSampler that can start mid-epoch and tells the dataset the epoch.

    Each epoch's order is a permutation seeded by (seed, epoch), the same on every rank, padded by
    repetition to a multiple of `num_replicas`; rank r takes positions r, r + num_replicas, ...
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
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch, start_index=0):
        """Iterate over `epoch`, skipping the first `start_index` samples of this rank (those a
        resumed run already consumed in that epoch)."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(
                f'start_index {start_index} must lie in [0, {self.num_samples}] (this '
                f"rank's samples per epoch)."
            )
        self.epoch, self.start_index = epoch, start_index

    def epoch_indices(self):
        """This rank's full index sequence for the current epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, 0, 'shuffle')
            )
            indices = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_len))
        while len(indices) < self.total_size:  # a loop: the padding may exceed the dataset
            indices += indices[: self.total_size - len(indices)]
        return indices[self.rank :: self.num_replicas]

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, index) for index in self.epoch_indices()[self.start_index :]])

    def __len__(self):
        return self.num_samples - self.start_index


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
