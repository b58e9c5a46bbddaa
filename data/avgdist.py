"""AvgDist (section 4.1.2, Figure 3a): the mean Euclidean distance, in pixels, from each masked
pixel to the nearest visible pixel (pixel centres; the image border is not visible).

    avg_dist(pixel_mask)                          one mask, (H, W) with 1 = masked
    mean_avg_dist(mask_generator, num_masks=100)  over masks drawn from a generator, pooled over all
                                                  their masked pixels
"""

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from utils.mask_grid import upsample_mask

from .seeding import sample_seed


def masked_pixel_distances(pixel_mask):
    """Distances of the masked pixels of `pixel_mask` ((H, W), nonzero = masked) to their nearest
    visible pixel, as a 1-D float64 array (exact Euclidean distance transform)."""
    pixel_mask = np.asarray(pixel_mask) != 0
    if pixel_mask.all():
        raise ValueError('AvgDist is undefined for a mask without visible pixels.')
    return distance_transform_edt(pixel_mask)[pixel_mask]


def avg_dist(pixel_mask):
    """AvgDist of one (H, W) pixel mask (nonzero = masked); 0.0 when nothing is masked."""
    distances = masked_pixel_distances(pixel_mask)
    return float(distances.mean()) if distances.size else 0.0


def mean_avg_dist(mask_generator, num_masks=100, seed=0):
    """AvgDist of `num_masks` masks from `mask_generator` (mask i drawn from a generator seeded by
    (seed, i)), pooled over all their masked pixels, and the mean masked fraction:
    returns (avg_dist, masked_fraction)."""
    total, masked, pixels = 0.0, 0, 0
    for i in range(num_masks):
        generator = torch.Generator().manual_seed(sample_seed(seed, 0, i, 'avgdist'))
        pixel_mask = upsample_mask(mask_generator(generator), mask_generator.model_patch_size)
        distances = masked_pixel_distances(pixel_mask.numpy())
        total, masked = total + distances.sum(), masked + distances.size
        pixels += pixel_mask.numel()
    return total / max(masked, 1), masked / pixels
