"""Mask generators: which model patches of an image are masked.

A generator chooses mask patches (``mask_patch_size`` pixels, 32 in the paper) on a coarse grid and
upsamples that grid to the encoder's patch grid (``model_patch_size`` pixels, 4 for Swin, 16 for
ViT). The two sizes are independent because SimMIM predicts raw pixels (Table 1, §3.1 of the
reference). A new strategy is a subclass overriding `choose_mask_patches` plus an entry in
`MASK_GENERATORS`.
"""
import math

import torch

from config import model_patch_size


class MaskGenerator:
    """Uniformly random masking, as in the official SimMIM code.

    ``__call__(generator)`` returns an int64 tensor of shape
    (input_size / model_patch_size, input_size / model_patch_size), 1 = masked.
    """

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        if mask_patch_size <= 0 or input_size % mask_patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the mask patch size "
                             f"{mask_patch_size}; the mask grid must tile the image.")
        if model_patch_size <= 0 or mask_patch_size % model_patch_size:
            raise ValueError(f"mask patch size {mask_patch_size} is not divisible by the model patch "
                             f"size {model_patch_size}; a mask patch must cover whole model patches.")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask ratio {mask_ratio} must lie in (0, 1).")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.mask_grid_size = input_size // mask_patch_size  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # model patches per mask patch, per side
        self.num_mask_patches = self.mask_grid_size ** 2
        self.num_masked = int(math.ceil(self.num_mask_patches * mask_ratio))
        self.output_size = self.mask_grid_size * self.scale  # model patches per side

    def choose_mask_patches(self, generator):
        """(mask_grid_size, mask_grid_size) int64 grid of mask patches, 1 = masked."""
        order = torch.randperm(self.num_mask_patches, generator=generator)
        grid = torch.zeros(self.num_mask_patches, dtype=torch.int64)
        grid[order[:self.num_masked]] = 1
        return grid.view(self.mask_grid_size, self.mask_grid_size)

    def __call__(self, generator=None):
        """The mask at model-patch resolution, drawn from `generator` (torch's global RNG if None)."""
        grid = self.choose_mask_patches(generator)
        return grid.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)

    def __repr__(self):
        return (f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size="
                f"{self.mask_patch_size}, model_patch_size={self.model_patch_size}, mask_ratio="
                f"{self.mask_ratio}: {self.num_masked}/{self.num_mask_patches} mask patches, output "
                f"{self.output_size}x{self.output_size})")


MASK_GENERATORS = {
    'random': MaskGenerator,
}


def build_mask_generator(config, strategy='random'):
    """The mask generator for a (pre-training) config.

    `strategy` is a key of MASK_GENERATORS; it becomes a config key when a second strategy lands.
    """
    if strategy not in MASK_GENERATORS:
        raise ValueError(f"Unknown mask strategy '{strategy}'; known: {sorted(MASK_GENERATORS)}.")
    return MASK_GENERATORS[strategy](
        input_size=config.DATA.IMG_SIZE,
        mask_patch_size=config.DATA.MASK_PATCH_SIZE,
        model_patch_size=model_patch_size(config),
        mask_ratio=config.DATA.MASK_RATIO,
    )
