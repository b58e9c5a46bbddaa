"""Shared test set-up: the repository root on sys.path, and tiny-run helpers."""
import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Everything the tests compare against lives in the repository (tests/fixtures/README.md).
FIXTURES_DIR = os.path.join(ROOT, 'tests', 'fixtures')
STATE_DICT_KEYS_DIR = os.path.join(FIXTURES_DIR, 'state_dict_keys')


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
