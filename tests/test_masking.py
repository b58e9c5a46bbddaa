import math

import numpy as np
import pytest
import torch

from config import load_config
from data.masking import (
    MASK_GENERATORS,
    BlockwiseMaskGenerator,
    MaskGenerator,
    SquareMaskGenerator,
    build_mask_generator,
)
from models import model_patch_size
from utils.mask_grid import pixel_mask_to_patches, upsample_mask


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    'input_size, mask_patch, model_patch, ratio, grid, masked, out',
    [
        (192, 32, 4, 0.6, 6, 22, 48),  # Swin pre-training (§3.1 worked numbers)
        (224, 32, 16, 0.6, 7, 30, 14),  # ViT pre-training
        (192, 16, 4, 0.4, 12, 58, 48),
        (64, 8, 4, 0.75, 8, 48, 16),
        (32, 32, 32, 0.1, 1, 1, 1),
    ],
)
def test_masked_count_is_ceil_of_ratio_and_shape_is_model_patch_grid(
    input_size, mask_patch, model_patch, ratio, grid, masked, out
):
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


@pytest.mark.parametrize(
    'kwargs, words',
    [
        (dict(input_size=200, mask_patch_size=32), ['200', '32']),
        (dict(mask_patch_size=32, model_patch_size=6), ['32', '6']),
        (dict(mask_ratio=0.0), ['0.0']),
        (dict(mask_ratio=1.0), ['1.0']),
    ],
)
def test_bad_sizes_and_ratios_raise_value_error_naming_the_numbers(kwargs, words):
    with pytest.raises(ValueError) as info:
        MaskGenerator(**kwargs)
    assert all(w in str(info.value) for w in words)


def test_build_mask_generator_reads_the_config(tmp_path):
    cfg = tmp_path / 'vit.yaml'
    cfg.write_text(
        'MODEL:\n  TYPE: vit\n  VIT:\n    PATCH_SIZE: 16\n'
        'DATA:\n  IMG_SIZE: 224\n  MASK_PATCH_SIZE: 32\n  MASK_RATIO: 0.6\n'
    )
    config = load_config(str(cfg))
    gen = build_mask_generator(config, model_patch_size(config))
    assert isinstance(gen, MASK_GENERATORS['random'])
    assert (gen.model_patch_size, gen.num_masked, gen.output_size) == (16, 30, 14)


# -----------------------------------------------------------------------------------------------
# Every strategy: format, masked fraction, reproducibility (Table 1, Figure 2)
# -----------------------------------------------------------------------------------------------
SIZES = [
    (192, 32, 4, 0.6),
    (192, 16, 4, 0.4),
    (224, 32, 16, 0.6),
    (64, 8, 4, 0.8),
    (192, 64, 4, 0.2),
]


@pytest.mark.parametrize('strategy', sorted(MASK_GENERATORS))
@pytest.mark.parametrize('input_size, mask_patch, model_patch, ratio', SIZES)
def test_every_strategy_gives_binary_model_patch_grid_with_its_masked_count(
    strategy, input_size, mask_patch, model_patch, ratio
):
    gen = MASK_GENERATORS[strategy](input_size, mask_patch, model_patch, ratio)
    out, scale = input_size // model_patch, mask_patch // model_patch
    for seed in range(4):
        mask = gen(_generator(seed))
        assert mask.shape == (out, out) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1}
        assert mask.sum().item() == gen.num_masked * scale * scale
        blocks = mask.view(out // scale, scale, out // scale, scale)
        assert torch.equal(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)))  # whole mask patches
    if strategy != 'square':  # square masks come in whole squares only
        assert gen.num_masked == math.ceil(ratio * gen.num_mask_patches)


@pytest.mark.parametrize('strategy', sorted(MASK_GENERATORS))
def test_every_strategy_is_a_pure_function_of_the_generator(strategy):
    gen = MASK_GENERATORS[strategy](192, 16, 4, 0.4)
    assert torch.equal(gen(_generator(3)), gen(_generator(3)))
    assert len({tuple(gen(_generator(seed)).flatten().tolist()) for seed in range(6)}) > 1
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    gen(_generator(1))
    assert np.random.rand() == expected


@pytest.mark.parametrize('ratio, side', [(0.11, 2), (0.25, 3), (0.44, 4), (0.6, 5), (0.9, 5)])
def test_square_mask_is_one_square_of_the_nearest_area(ratio, side):
    """Table 1's rows: 0.11 -> 2x2, 0.25 -> 3x3, 0.44 -> 4x4 of the 6x6 grid; never the whole
    image."""
    gen = SquareMaskGenerator(192, 32, 4, ratio)
    assert gen.side == side and gen.num_masked == side * side
    for seed in range(5):
        grid = gen.choose_mask_patches(_generator(seed))
        rows, cols = grid.nonzero(as_tuple=True)
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        assert grid.sum() == side * side


def test_square_mask_position_is_uniform_over_the_grid():
    gen = SquareMaskGenerator(192, 32, 4, 0.44)  # 4x4 in 6x6: 3 x 3 positions
    corners = {
        tuple(gen.choose_mask_patches(_generator(s)).nonzero()[0].tolist()) for s in range(200)
    }
    assert corners == {(r, c) for r in range(3) for c in range(3)}


def test_blockwise_blocks_follow_min_area_and_aspect_range():
    """Area exactly 4 patches (min = max = 4) and aspect 1 -> every block that had a budget of 4
    is 2x2; aspect 4 -> 4x1."""
    for aspect, shape in ((1.0, (2, 2)), (4.0, (4, 1))):
        gen = BlockwiseMaskGenerator(
            192,
            16,
            4,
            0.5,
            min_patches_per_block=4,
            max_patches_per_block=4,
            aspect_ratio_range=(aspect, aspect),
        )
        for seed in range(5):
            grid, blocks = gen.draw_blocks(np.random.default_rng(seed))
            painted = np.zeros_like(grid)
            for top, left, h, w in blocks:
                budget = gen.num_masked - painted.sum()
                if budget >= 4:
                    assert (h, w) == shape
                painted[top : top + h, left : left + w] = 1
            assert np.array_equal(painted, grid) and grid.sum() <= gen.num_masked
            assert len(blocks) >= gen.num_masked // 4 // 2  # mostly blocks, not the random top-up


def test_blockwise_default_min_block_is_beits_64_pixels_square():
    assert BlockwiseMaskGenerator(192, 16, 4, 0.4).min_patches_per_block == 16  # BEiT's 16
    assert BlockwiseMaskGenerator(192, 32, 4, 0.4).min_patches_per_block == 4
    assert (
        BlockwiseMaskGenerator(192, 8, 4, 0.4, min_patches_per_block=3).min_patches_per_block == 3
    )


def test_blockwise_masks_are_clumped_compared_with_random():
    """Block-wise masks have far fewer masked/visible edges than random masks of the same count."""

    def edges(mask):
        return ((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()).item()

    blockwise, random = BlockwiseMaskGenerator(192, 16, 16, 0.4), MaskGenerator(192, 16, 16, 0.4)
    assert sum(edges(blockwise(_generator(s))) for s in range(10)) < 0.6 * sum(
        edges(random(_generator(s))) for s in range(10)
    )


def test_build_mask_generator_reads_strategy_and_blockwise_keys(tmp_path):
    cfg = tmp_path / 'blockwise.yaml'
    cfg.write_text(
        'DATA:\n  IMG_SIZE: 192\n  MASK_PATCH_SIZE: 16\n  MASK_RATIO: 0.4\n'
        '  MASK_STRATEGY: blockwise\n  BLOCKWISE:\n    MIN_PATCHES_PER_BLOCK: 9\n'
        '    MAX_PATCHES_PER_BLOCK: 30\n    ASPECT_RATIO_RANGE: [0.5, 2.0]\n'
        'MODEL:\n  SWIN:\n    WINDOW_SIZE: 6\n'
    )
    config = load_config(str(cfg))
    gen = build_mask_generator(config, model_patch_size(config))
    assert isinstance(gen, BlockwiseMaskGenerator)
    assert (gen.min_patches_per_block, gen.max_patches_per_block) == (9, 30)
    assert gen.log_aspect_range == pytest.approx((math.log(0.5), math.log(2.0)))
    square = build_mask_generator(config, 4, 'square', mask_patch_size=32, mask_ratio=0.25)
    assert isinstance(square, SquareMaskGenerator) and square.side == 3


def test_upsample_mask_and_pixel_mask_to_patches_are_inverse_on_patch_masks():
    mask = torch.tensor([[1, 0], [0, 1]])
    pixels = upsample_mask(mask, 4)
    assert pixels.shape == (8, 8) and pixels[:4, :4].all() and not pixels[:4, 4:].any()
    assert torch.equal(pixel_mask_to_patches(pixels, 4), mask)
    drawn = torch.zeros(8, 8)
    drawn[0:2, 0:4] = 1  # half of patch (0, 0): masked; a quarter of patch (0, 1): visible
    drawn[0:2, 4:6] = 1
    assert pixel_mask_to_patches(drawn, 4).tolist() == [[1, 0], [0, 0]]


@pytest.mark.parametrize('strategy', sorted(MASK_GENERATORS))
def test_mask_upsampling_in_numpy_equals_repeat_interleave(strategy):
    """__call__ upsamples with numpy (faster); the mask is the torch upsampling of the same draw,
    so masks are unchanged from before, with their exact counts."""
    gen = MASK_GENERATORS[strategy](192, 32, 4, 0.6)
    for seed in range(5):
        grid = gen.choose_mask_patches(_generator(seed))
        mask = gen(_generator(seed))
        assert torch.equal(mask, upsample_mask(grid, gen.scale))
        assert mask.sum() == gen.num_masked * gen.scale**2 and mask.is_contiguous()
