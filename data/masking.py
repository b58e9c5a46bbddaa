"""Mask generators: which model patches of an image are masked (§3.2, Table 1, Figure 2).

A generator chooses mask patches (``mask_patch_size`` pixels, 32 in the paper) on a coarse grid and
upsamples that grid to the encoder's patch grid (``model_patch_size`` pixels, 4 for Swin, 16 for
ViT). The two sizes are independent because SimMIM predicts raw pixels (Table 1, §3.1 of the
reference). Every strategy returns the same format: an int64 (input_size / model_patch_size)^2 grid,
1 = masked, drawn only from the torch.Generator it is given, so a mask is a pure function of
(seed, epoch, index) in the dataset.

A new strategy is a subclass overriding `choose_mask_patches` (and `config_kwargs` and
`check_options` if it has config keys of its own) plus an entry in `MASK_GENERATORS`;
DATA.MASK_STRATEGY picks it. The constructors are the one home of the checks, with messages naming
the config keys; `check_mask_config` (asked by the config validation) runs them.
"""

import math

import numpy as np
import torch
from yacs.config import CfgNode

from utils.errors import require
from utils.registry import Registry


def _numpy_rng(generator):
    """A numpy Generator seeded from `generator` (torch's global RNG if None), for strategies that
    draw many scalars; numpy's global RNG is left alone."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))


class MaskGenerator:
    """Uniformly random patch-aligned masking, as in the official SimMIM code: ceil(ratio * N) of
    the N mask patches.

    ``__call__(generator)`` returns an int64 tensor of shape
    (input_size / model_patch_size, input_size / model_patch_size), 1 = masked.
    """

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        # ConfigError is a ValueError; the messages name the keys the arguments come from.
        require(
            0 < mask_ratio < 1,
            f"DATA.MASK_RATIO must lie in (0, 1), got {mask_ratio} (the paper's default is 0.6).",
        )
        require(
            mask_patch_size > 0 and input_size % mask_patch_size == 0,
            f'DATA.IMG_SIZE {input_size} is not divisible by DATA.MASK_PATCH_SIZE '
            f'{mask_patch_size}; the mask grid must tile the image. Use a mask patch size that '
            f'divides {input_size}.',
        )
        require(
            model_patch_size > 0 and mask_patch_size % model_patch_size == 0,
            f'DATA.MASK_PATCH_SIZE {mask_patch_size} is not divisible by the model patch size '
            f"{model_patch_size} (PATCH_SIZE in the MODEL.TYPE's section); a mask patch must "
            f'cover whole model patches.',
        )
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.mask_grid_size = input_size // mask_patch_size  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # model patches per mask patch, per side
        self.num_mask_patches = self.mask_grid_size**2
        self.num_masked = int(math.ceil(self.num_mask_patches * mask_ratio))
        self.output_size = self.mask_grid_size * self.scale  # model patches per side

    @classmethod
    def config_kwargs(cls, config):
        """Constructor arguments of this strategy beyond the four common ones, from the config."""
        return {}

    @classmethod
    def check_options(cls, config):
        """Raise ConfigError for a bad value among this strategy's own config keys (checked
        whichever strategy is picked, so a mistake surfaces before the strategy is tried)."""

    def choose_mask_patches(self, generator):
        """(mask_grid_size, mask_grid_size) int64 grid of mask patches, 1 = masked."""
        order = torch.randperm(self.num_mask_patches, generator=generator).numpy()
        grid = np.zeros(self.num_mask_patches, dtype=np.int64)
        grid[order[: self.num_masked]] = 1
        return torch.from_numpy(grid.reshape(self.mask_grid_size, self.mask_grid_size))

    def __call__(self, generator=None):
        """The mask at model-patch resolution, drawn from `generator` (torch's global RNG if
        None)."""
        # numpy on these few hundred cells: about half the time of the same steps in torch ops
        # (benchmarks/loader_speed.py), with identical masks.
        grid = self.choose_mask_patches(generator).numpy()
        return torch.from_numpy(grid.repeat(self.scale, 0).repeat(self.scale, 1))

    def __repr__(self):
        return (
            f'{type(self).__name__}(input_size={self.input_size}, mask_patch_size='
            f'{self.mask_patch_size}, model_patch_size={self.model_patch_size}, mask_ratio='
            f'{self.mask_ratio}: {self.num_masked}/{self.num_mask_patches} mask patches, output '
            f'{self.output_size}x{self.output_size})'
        )


class SquareMaskGenerator(MaskGenerator):
    """One square of mask patches at a uniformly random position: the central-region masking of
    Pathak et al., relaxed to move anywhere (§3.2; Table 1 rows 0.11 (2x2), 0.25 (3x3), 0.44 (4x4)
    on the 6x6 grid of 32-px patches).

    The side s is the one whose area s^2 is closest to ratio * N (ties: the larger), kept between 1
    and mask_grid_size - 1 so that some pixels stay visible; the masked fraction is s^2 / N.
    """

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        super().__init__(input_size, mask_patch_size, model_patch_size, mask_ratio)
        grid = self.mask_grid_size
        require(
            grid >= 2,
            f'DATA.MASK_STRATEGY square needs a mask grid of at least 2x2; '
            f'DATA.IMG_SIZE {input_size} / DATA.MASK_PATCH_SIZE {mask_patch_size} is '
            f'{grid}. Use a smaller mask patch size.',
        )
        wanted = mask_ratio * self.num_mask_patches
        self.side = min(range(1, grid), key=lambda s: (abs(s * s - wanted), -s))
        self.num_masked = self.side**2

    def choose_mask_patches(self, generator):
        top, left = torch.randint(
            0, self.mask_grid_size - self.side + 1, (2,), generator=generator
        ).tolist()
        grid = torch.zeros(self.mask_grid_size, self.mask_grid_size, dtype=torch.int64)
        grid[top : top + self.side, left : left + self.side] = 1
        return grid


class BlockwiseMaskGenerator(MaskGenerator):
    """Block-wise masking of BEiT (§3.2, Table 1): rectangles of random area and aspect ratio are
    added until ceil(ratio * N) mask patches are masked.

    Each block: area uniform between `min_patches_per_block` and the patches still to mask (capped
    by `max_patches_per_block`), aspect ratio h/w log-uniform in `aspect_ratio_range`,
    h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), h and w smaller than the grid,
    top-left uniform. A block is kept if it masks at least one new patch and no more than are still
    to mask; after `max_attempts` rejected draws in a row the blocks stop, and (as in BEiT v2) the
    count is completed with uniformly random unmasked patches, so it is exact, as for random
    masking.

    min_patches_per_block=None keeps BEiT's minimum block of 16 16-px patches (64x64 pixels) in this
    mask patch size; max_patches_per_block=None means no cap (BEiT's default).
    """

    reference_min_block_pixels = 16 * 16 * 16  # BEiT: 16 patches of 16x16 pixels

    def __init__(
        self,
        input_size=192,
        mask_patch_size=16,
        model_patch_size=4,
        mask_ratio=0.6,
        min_patches_per_block=None,
        max_patches_per_block=None,
        aspect_ratio_range=(0.3, 1 / 0.3),
        max_attempts=10,
    ):
        super().__init__(input_size, mask_patch_size, model_patch_size, mask_ratio)
        self._check_block_options(min_patches_per_block, max_patches_per_block, aspect_ratio_range)
        if min_patches_per_block is None:
            min_patches_per_block = max(
                1, round(self.reference_min_block_pixels / mask_patch_size**2)
            )
        low, high = aspect_ratio_range
        self.min_patches_per_block = min_patches_per_block
        self.max_patches_per_block = max_patches_per_block or self.num_mask_patches
        self.log_aspect_range = (math.log(low), math.log(high))
        self.max_attempts = max_attempts

    @classmethod
    def config_kwargs(cls, config):
        block = config.DATA.BLOCKWISE
        return dict(
            min_patches_per_block=block.MIN_PATCHES_PER_BLOCK or None,
            max_patches_per_block=block.MAX_PATCHES_PER_BLOCK or None,
            aspect_ratio_range=tuple(block.ASPECT_RATIO_RANGE),
        )

    @classmethod
    def check_options(cls, config):
        cls._check_block_options(**cls.config_kwargs(config))

    @staticmethod
    def _check_block_options(min_patches_per_block, max_patches_per_block, aspect_ratio_range):
        sizes = (min_patches_per_block, max_patches_per_block)
        require(
            all(n is None or n >= 1 for n in sizes),
            f'DATA.BLOCKWISE.MIN_PATCHES_PER_BLOCK and MAX_PATCHES_PER_BLOCK must be >= 0 (0: '
            f'the default), got {[n or 0 for n in sizes]}.',
        )
        aspect = list(aspect_ratio_range)
        require(
            len(aspect) == 2 and 0 < aspect[0] <= aspect[1],
            f'DATA.BLOCKWISE.ASPECT_RATIO_RANGE must be [low, high] with 0 < low <= high, got '
            f'{aspect}.',
        )

    def _place_block(self, grid, rng, budget):
        """Try to add one block masking 1..budget new patches; return (top, left, h, w) or None."""
        side = self.mask_grid_size
        for _ in range(self.max_attempts):
            area = rng.uniform(*sorted((self.min_patches_per_block, budget)))  # as BEiT
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (h < side and w < side):
                continue
            top, left = rng.integers(0, side - h + 1), rng.integers(0, side - w + 1)
            block = grid[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = 1
                return int(top), int(left), h, w
        return None

    def draw_blocks(self, rng):
        """The blocks drawn from numpy Generator `rng`, before the count is completed: (grid of mask
        patches they cover, at most num_masked of them; list of blocks (top, left, h, w))."""
        grid = np.zeros((self.mask_grid_size, self.mask_grid_size), dtype=np.int64)
        blocks, count = [], 0
        while count < self.num_masked:
            budget = min(self.num_masked - count, self.max_patches_per_block)
            block = self._place_block(grid, rng, budget)
            if block is None:
                break
            blocks.append(block)
            count = int(grid.sum())
        return grid, blocks

    def choose_mask_patches(self, generator):
        rng = _numpy_rng(generator)
        grid, _ = self.draw_blocks(rng)
        missing = self.num_masked - int(grid.sum())
        if missing:
            free = np.flatnonzero(grid == 0)
            grid.flat[rng.choice(free, missing, replace=False)] = 1
        return torch.from_numpy(grid)


MASK_GENERATORS = Registry(
    'DATA.MASK_STRATEGY',
    'strategies',
    {
        'random': MaskGenerator,
        'square': SquareMaskGenerator,
        'blockwise': BlockwiseMaskGenerator,
    },
)


def build_mask_generator(
    config: CfgNode,
    model_patch_size: int,
    strategy: str | None = None,
    mask_patch_size: int | None = None,
    mask_ratio: float | None = None,
) -> 'MaskGenerator':
    """The mask generator for a (pre-training) config and the encoder's patch size (pixels):
    DATA.MASK_STRATEGY with DATA.MASK_PATCH_SIZE, DATA.MASK_RATIO and the strategy's own keys;
    arguments given here override those three."""
    strategy = strategy or config.DATA.MASK_STRATEGY
    generator_class = MASK_GENERATORS.lookup(strategy)
    return generator_class(
        input_size=config.DATA.IMG_SIZE,
        mask_patch_size=mask_patch_size or config.DATA.MASK_PATCH_SIZE,
        model_patch_size=model_patch_size,
        mask_ratio=mask_ratio or config.DATA.MASK_RATIO,
        **generator_class.config_kwargs(config),
    )


def check_mask_config(config, model_patch_size):
    """Raise ConfigError for a bad masking section: the picked DATA.MASK_STRATEGY must be registered
    and fit DATA.IMG_SIZE, DATA.MASK_PATCH_SIZE, DATA.MASK_RATIO and the model patch size; every
    registered strategy's own keys must be valid."""
    build_mask_generator(config, model_patch_size)
    for generator_class in MASK_GENERATORS.values():
        generator_class.check_options(config)
