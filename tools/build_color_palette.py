"""Build the colour palette of the color_clusters target (iGPT-style, Table 5): k-means over pixels
sampled from the training images of a pre-training config.

    python -m tools.build_color_palette \
        --cfg configs/ablations/table5_target/igpt_cluster__res48.yaml \
        --data-path /data/imagenet/train
    python -m tools.build_color_palette --cfg FILE --opts DATA.DATASET synthetic --output palette.pt

The images are the config's training samples (same data source and crops as pre-training).
The palette, (MODEL.SIMMIM.TARGET.NUM_CLUSTERS, 3) RGB in [0, 1] sorted by brightness, is written to
--output (default: MODEL.SIMMIM.TARGET.PALETTE) as a tensor (.pt) or a numpy array (.npy).
"""

import argparse
import logging
import os
import sys

import numpy as np
import torch

from config import load_config
from data import build_pretrain_data
from engine.launch import prepare_output_dir, run_tool
from models import model_patch_size
from models.targets import nearest_color_index, normalized_to_rgb
from utils.errors import ConfigError


def kmeans(points, k, iterations=30, generator=None):
    """Lloyd's k-means of (N, D) `points`: (k, D) centres, initialised with k distinct points drawn
    at random; a centre left without points moves to the point farthest from its centre."""
    if points.shape[0] < k:
        raise ValueError(f'k-means needs at least k = {k} points, got {points.shape[0]}.')
    centres = points[torch.randperm(points.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = nearest_color_index(points, centres)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        updated = sums / counts.clamp(min=1).unsqueeze(1)
        empty = counts == 0
        if empty.any():
            distance = (points - updated[assignment]).norm(dim=1)
            updated[empty] = points[distance.topk(int(empty.sum())).indices]
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


def sample_pixels(dataset, num_images, pixels_per_image, generator):
    """(num_images * pixels_per_image, 3) RGB pixels in [0, 1] from randomly chosen samples of a
    pre-training dataset (epoch-0 crops)."""
    indices = torch.randperm(len(dataset), generator=generator)[:num_images].tolist()
    pixels = []
    for index in indices:
        rgb = normalized_to_rgb(dataset[(0, index)][0].unsqueeze(0))[0].flatten(1).T  # (H*W, 3)
        pixels.append(rgb[torch.randint(rgb.shape[0], (pixels_per_image,), generator=generator)])
    return torch.cat(pixels)


def save_palette(palette, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith('.npy'):
        np.save(path, palette.numpy())
    else:
        torch.save(palette, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cfg', required=True, metavar='FILE', help='pre-training config')
    parser.add_argument('--data-path', help='training image folder (DATA.DATA_PATH)')
    parser.add_argument('--opts', nargs='+', action='extend', default=[], metavar='KEY VALUE')
    parser.add_argument(
        '--output', help='palette file (.pt or .npy); default: MODEL.SIMMIM.TARGET.PALETTE'
    )
    parser.add_argument('--num-colors', type=int, help='default: MODEL.SIMMIM.TARGET.NUM_CLUSTERS')
    parser.add_argument('--num-images', type=int, default=1000)
    parser.add_argument('--pixels-per-image', type=int, default=256)
    parser.add_argument('--iterations', type=int, default=30)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    # One sample at a time in this process; the palette key may not point to a file yet.
    opts = list(args.opts) + ['DATA.BATCH_SIZE', '1', 'DATA.NUM_WORKERS', '0']
    if args.output:
        opts += ['MODEL.SIMMIM.TARGET.PALETTE', args.output]
    config = load_config(args.cfg, opts, data_path=args.data_path)
    output = config.MODEL.SIMMIM.TARGET.PALETTE
    if not output:
        parser.error('give --output PATH (the config has no MODEL.SIMMIM.TARGET.PALETTE)')
    num_colors = args.num_colors or config.MODEL.SIMMIM.TARGET.NUM_CLUSTERS
    for flag, value in (
        ('--num-colors', num_colors),
        ('--num-images', args.num_images),
        ('--pixels-per-image', args.pixels_per_image),
    ):
        if value < 1:
            raise ConfigError(f'{flag} must be at least 1, got {value}.')
    prepare_output_dir(os.path.dirname(os.path.abspath(output)))

    logging.basicConfig(level=logging.INFO, format='%(message)s')
    dataset = build_pretrain_data(
        config, model_patch_size(config), logging.getLogger('simmim.palette')
    ).train_set
    generator = torch.Generator().manual_seed(args.seed)
    pixels = sample_pixels(dataset, args.num_images, args.pixels_per_image, generator)
    if pixels.shape[0] < num_colors:
        raise ConfigError(
            f'{num_colors} colours need at least as many sampled pixels, but '
            f'{min(args.num_images, len(dataset))} image(s) x --pixels-per-image '
            f'{args.pixels_per_image} give {pixels.shape[0]}. Raise --num-images or '
            f'--pixels-per-image, or lower --num-colors.'
        )
    palette = kmeans(pixels, num_colors, args.iterations, generator)
    palette = palette[palette.sum(dim=1).argsort()]
    save_palette(palette, output)
    print(
        f'{num_colors}-colour palette from {pixels.shape[0]} pixels of '
        f'{min(args.num_images, len(dataset))} images saved to {output}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
