"""Shared test set-up: the repository root on sys.path, and tiny-run helpers."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Everything the tests compare against lives in the repository (tests/fixtures/README.md).
FIXTURES_DIR = os.path.join(ROOT, 'tests', 'fixtures')
STATE_DICT_KEYS_DIR = os.path.join(FIXTURES_DIR, 'state_dict_keys')
