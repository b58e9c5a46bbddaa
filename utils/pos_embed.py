"""Resizing position encodings of a checkpoint to a model with another window or image size.

    resize_rel_pos_bias_table(table, dst_side, num_extra_tokens=0)   geometric interpolation
    geometric_ratio(src_side, dst_side)                              its ratio q
    geometric_positions(src_side, q)                                 its source sample positions
    resize_abs_pos_embed(pos_embed, dst_grid, num_extra_tokens=0)    bicubic on the patch grid

Relative-position-bias tables (one row per offset of a (2W-1) x (2W-1) grid; "side" below is
2W-1) are resized by the official geometric interpolation, absolute position embeddings bicubically
on the patch grid. The maths and the SciPy replacement of the official interp2d:
docs/finetuning.md.
"""

import math

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline
from timm.layers import resample_abs_pos_embed

# A table of side 3 (window 2) has one offset on each side of 0, which no ratio q can stretch
# (1 + q + ... has a single term): its offsets are placed at 0 and +-(target side // 2) instead,
# so the outermost source offset still lands on the outermost target one, and the spline is
# quadratic (three points per axis allow no higher order). Side 1 (window 1) is a constant.
SMALLEST_GEOMETRIC_SIDE = 5
GEOMETRIC_Q_BOUNDS = (1.01, 1.5)  # bisection interval of the official code
GEOMETRIC_Q_TOLERANCE = 1e-6


def geometric_ratio(src_side, dst_side):
    """q with 1 + q + ... + q^(src_side//2 - 1) ~= dst_side // 2, by the official bisection."""
    left, right = GEOMETRIC_Q_BOUNDS
    n = src_side // 2
    while right - left > GEOMETRIC_Q_TOLERANCE:
        q = (left + right) / 2.0
        if (1.0 - q**n) / (1.0 - q) > dst_side // 2:
            right = q
        else:
            left = q
    return q


def geometric_positions(src_side, q):
    """The src_side source offsets: 0 and the cumulative sums 1, 1+q, ... mirrored around 0."""
    distances = np.cumsum(q ** np.arange(src_side // 2))
    return np.concatenate([-distances[::-1], [0.0], distances])


def resize_rel_pos_bias_table(table, dst_side, num_extra_tokens=0):
    """Resize a (src_side**2 + num_extra_tokens, num_heads) table to (dst_side**2 +
    num_extra_tokens, num_heads). The extra rows (ViT: cls-to-token, token-to-cls, cls-to-cls)
    are kept unchanged at the end."""
    num_rows, num_heads = table.shape
    grid_rows = num_rows - num_extra_tokens
    src_side = int(round(grid_rows**0.5))
    if src_side * src_side != grid_rows:
        raise ValueError(
            f'A relative position bias table with {num_rows} rows and '
            f'{num_extra_tokens} extra rows is not a square grid of offsets.'
        )
    if src_side == dst_side:
        return table.clone()
    grid, extra = table[:grid_rows], table[grid_rows:]
    half = dst_side // 2
    if src_side == 1:  # window 1: a single offset, the same bias everywhere
        return torch.cat([grid.expand(dst_side * dst_side, num_heads), extra], dim=0)
    if src_side < SMALLEST_GEOMETRIC_SIDE:
        src_pos = np.array([-1.0, 0.0, 1.0]) * max(half, 1)
    else:
        src_pos = geometric_positions(src_side, geometric_ratio(src_side, dst_side))
    order = min(3, src_side - 1)
    dst_pos = np.arange(-half, half + 0.1, 1.0)
    heads = []
    for h in range(num_heads):
        z = grid[:, h].reshape(src_side, src_side).double().cpu().numpy()
        spline = RectBivariateSpline(src_pos, src_pos, z.T, kx=order, ky=order, s=0)
        heads.append(torch.from_numpy(spline(dst_pos, dst_pos).T.copy()).reshape(-1))
    resized = torch.stack(heads, dim=1).to(device=table.device, dtype=table.dtype)
    return torch.cat([resized, extra], dim=0)


def resize_abs_pos_embed(pos_embed, dst_grid, num_extra_tokens=0):
    """Resize a (1, num_extra_tokens + side**2, C) absolute position embedding to the patch grid
    dst_grid = (h, w) by bicubic interpolation (align_corners=False, no antialiasing, in fp32, as
    the official code); the leading extra tokens (ViT cls) are kept. timm's resampler does the
    work; antialias=False matters, timm's default antialiasing gives other values."""
    num_patches = pos_embed.shape[1] - num_extra_tokens
    if math.isqrt(num_patches) ** 2 != num_patches:
        raise ValueError(
            f'A position embedding of {num_patches} patch tokens is not a square grid.'
        )
    return resample_abs_pos_embed(
        pos_embed, list(dst_grid), num_prefix_tokens=num_extra_tokens, antialias=False
    )
