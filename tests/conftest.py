"""Shared test set-up: the repository root on sys.path, and tiny-run helpers."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Reference material shared by every checkout and CI run, beside the project root.
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
FIXTURES_DIR = os.path.join(SHARED, 'reference', 'fixtures')
STATE_DICT_KEYS_DIR = os.path.join(SHARED, 'reference', 'state_dict_keys')
