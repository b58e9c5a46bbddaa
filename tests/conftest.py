"""Shared test set-up: the repository root on sys.path, and tiny-run helpers."""
import os
import sys

import numpy as np
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
        (width, height), Image.BICUBIC)
    ramp = np.linspace(0, 120, width)[None, :, None] + np.linspace(0, 80, height)[:, None, None]
    return Image.fromarray(np.clip(np.asarray(field) * 0.4 + ramp, 0, 255).astype(np.uint8))
