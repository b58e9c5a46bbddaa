"""Shared test set-up: the repository root on sys.path, and tiny-run helpers."""

import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Everything the tests compare against lives in the repository (tests/fixtures/README.md).
FIXTURES_DIR = os.path.join(ROOT, 'tests', 'fixtures')
STATE_DICT_KEYS_DIR = os.path.join(FIXTURES_DIR, 'state_dict_keys')


def smooth_photo(width, height, seed=0):
    """Smooth colours (so a reduced decode changes pixels only slightly) with a ramp in x and y,
    so a misplaced crop box shows as a large difference."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    ramp = np.linspace(0, 120, width)[None, :, None] + np.linspace(0, 80, height)[:, None, None]
    return Image.fromarray(np.clip(np.asarray(field) * 0.4 + ramp, 0, 255).astype(np.uint8))


@pytest.fixture(autouse=True)
def _library_logger_left_to_its_run():
    """An in-process run points the 'simmim' library logger at that test's captured stdout;
    a later test must not write to it once pytest has closed it."""
    yield
    logging.getLogger('simmim').handlers.clear()


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny models: on the shared 2-core CI machine, thread hand-offs cost
    more than they save (a tiny export ran 6x faster)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fsynced(monkeypatch):
    """The paths os.fsync is called on from now on (files by the name they had then, folders),
    as a list that grows: for tests that a write goes through utils.atomic_write."""
    paths, real_fsync = [], os.fsync

    def recording_fsync(fd):
        paths.append(os.readlink(f'/proc/self/fd/{fd}'))
        return real_fsync(fd)

    monkeypatch.setattr(os, 'fsync', recording_fsync)
    return paths
