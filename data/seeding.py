"""Per-sample seeds, so that a sample is a pure function of (seed, epoch, index) whatever the
worker, rank or resume point that produces it."""

import contextlib
import hashlib
import random

import numpy as np
import torch


def sample_seed(seed, epoch, index, stream):
    """A 63-bit seed for one use (`stream`, e.g. 'mask' or 'augment') of one sample in one epoch.

    A hash rather than ``seed + epoch + index`` so that neighbouring tuples (and streams) give
    unrelated seeds.
    """
    key = f'{int(seed)}|{int(epoch)}|{int(index)}|{stream}'.encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), 'little') >> 1


@contextlib.contextmanager
def seeded_torch_rng(seed):
    """Seed torch's global CPU RNG for the block, then restore its state: seeded_global_rngs for
    code that draws from torch only (the pre-training crop plan), at 1/20 of its cost."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


@contextlib.contextmanager
def seeded_global_rngs(seed):
    """Seed python `random`, numpy's global RNG and torch's global CPU RNG for the block, then
    restore their previous states.

    Transforms from torchvision and timm draw from these global RNGs; restoring them matters with
    num_workers=0, where the dataset runs in the main process next to the training loop.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seeding takes 32 bits
    # Not torch.manual_seed: that also reseeds the CUDA generators, which are none of our business.
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
