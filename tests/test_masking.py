import math

import pytest
import torch

from config import load_config
from data.masking import MASK_GENERATORS, MaskGenerator, build_mask_generator


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('input_size, mask_patch, model_patch, ratio, grid, masked, out', [
    (192, 32, 4, 0.6, 6, 22, 48),  # Swin pre-training (§3.1 worked numbers)
    (224, 32, 16, 0.6, 7, 30, 14),  # ViT pre-training
    (192, 16, 4, 0.4, 12, 58, 48),
    (64, 8, 4, 0.75, 8, 48, 16),
    (32, 32, 32, 0.1, 1, 1, 1),
])
def test_masked_count_is_ceil_of_ratio_and_shape_is_model_patch_grid(
        input_size, mask_patch, model_patch, ratio, grid, masked, out):
    gen = MaskGenerator(input_size, mask_patch, model_patch, ratio)
    assert (gen.mask_grid_size, gen.num_mask_patches) == (grid, grid * grid)
    assert gen.num_masked == masked == math.ceil(ratio * grid * grid)
    scale = mask_patch // model_patch
    for seed in range(3):
        mask = gen(_generator(seed))
        assert mask.shape == (out, out) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1}
        assert mask.sum().item() == masked * scale * scale


def test_mask_is_constant_over_each_mask_patch():
    gen = MaskGenerator(192, 32, 4, 0.6)
    mask = gen(_generator(0))
    blocks = mask.view(6, 8, 6, 8)  # (grid row, row in block, grid col, col in block)
    assert torch.equal(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)))


def test_same_generator_seed_gives_same_mask_and_different_seeds_differ():
    gen = MaskGenerator(192, 32, 4, 0.6)
    assert torch.equal(gen(_generator(7)), gen(_generator(7)))
    masks = [gen(_generator(seed)) for seed in range(5)]
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 5


def test_mask_does_not_touch_numpy_global_rng():
    import numpy as np
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    MaskGenerator()(_generator(1))
    assert np.random.rand() == expected


@pytest.mark.parametrize('kwargs, words', [
    (dict(input_size=200, mask_patch_size=32), ['200', '32']),
    (dict(mask_patch_size=32, model_patch_size=6), ['32', '6']),
    (dict(mask_ratio=0.0), ['0.0']),
    (dict(mask_ratio=1.0), ['1.0']),
])
def test_bad_sizes_and_ratios_raise_value_error_naming_the_numbers(kwargs, words):
    with pytest.raises(ValueError) as info:
        MaskGenerator(**kwargs)
    assert all(w in str(info.value) for w in words)


def test_build_mask_generator_reads_the_config(tmp_path):
    cfg = tmp_path / 'vit.yaml'
    cfg.write_text('MODEL:\n  TYPE: vit\n  VIT:\n    PATCH_SIZE: 16\n'
                   'DATA:\n  IMG_SIZE: 224\n  MASK_PATCH_SIZE: 32\n  MASK_RATIO: 0.6\n')
    gen = build_mask_generator(load_config(str(cfg)))
    assert isinstance(gen, MASK_GENERATORS['random'])
    assert (gen.model_patch_size, gen.num_masked, gen.output_size) == (16, 30, 14)
