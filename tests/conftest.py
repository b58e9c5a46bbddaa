"""Shared test set-up: the repository root on sys.path, and tiny-run helpers."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Reference material shared by every checkout and CI run, beside the project root.
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
FIXTURES_DIR = os.path.join(SHARED, 'reference', 'fixtures')
STATE_DICT_KEYS_DIR = os.path.join(SHARED, 'reference', 'state_dict_keys')


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny models: on the shared 2-core CI machine, thread hand-offs cost
    more than they save (a tiny export ran 6x faster)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
