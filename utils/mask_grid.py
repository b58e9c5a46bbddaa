"""Conversions between masks at the mask-patch, model-patch and pixel resolutions, shared by the
mask generators (data/masking.py), the losses (models/targets.py) and the visualisation tools.
A leaf module (torch only), so models need not import the data pipeline for them."""

import torch
import torch.nn.functional as F


def upsample_mask(mask, scale):
    """(..., h, w) -> (..., h * scale, w * scale): each cell repeated `scale` x `scale` times."""
    return mask.repeat_interleave(scale, -2).repeat_interleave(scale, -1)


def pixel_mask_to_patches(pixel_mask, model_patch_size):
    """(..., H, W) pixel mask (nonzero = masked) -> (..., H/p, W/p) int64 mask at the model patch
    size p: a patch is masked when at least half of its pixels are (for masks drawn by hand)."""
    masked = (torch.as_tensor(pixel_mask) != 0).float()
    pooled = F.avg_pool2d(masked.view(-1, 1, *masked.shape[-2:]), model_patch_size)
    return (pooled >= 0.5).long().view(*masked.shape[:-2], *pooled.shape[-2:])
