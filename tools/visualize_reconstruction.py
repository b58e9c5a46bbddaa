"""Reconstruction figures (Figures 4-6) from a pre-training checkpoint: one PNG grid per mask
setting, one row per image: original | masked input | prediction | prediction pasted into the
visible pixels.

    # Figure 6: random masks of several mask patch sizes at ratio 0.6, on the synthetic images
    python -m tools.visualize_reconstruction --checkpoint output/.../ckpt_epoch_99.pth \
        --mask-patch-size 4 8 16 32 64 --mask-ratio 0.6
    # Figure 4: hand-made masks on your own images (white = masked), or a box in pixels
    python -m tools.visualize_reconstruction --checkpoint CKPT --images DIR --mask-image mask.png
    python -m tools.visualize_reconstruction --checkpoint CKPT --images DIR --box 40 40 150 150

The config comes from the checkpoint (or --cfg, plus --opts). Images are resized (shorter side) and
centre-cropped to DATA.IMG_SIZE; without --images the synthetic validation images are used.
Hand-made masks are moved to the model patch grid (a patch is masked when half of it is), which is
what the model sees and what the grid shows.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from checkpoint.stored_config import checkpoint_config
from checkpoint.weights import load_full_state_dict
from data.datasets import ImageFolderDataset
from data.masking import MASK_GENERATORS, build_mask_generator
from data.seeding import sample_seed
from data.synthetic import SyntheticShapes
from data.transforms import normalize
from engine.figures import reconstruct_images, reconstruction_grid, save_png
from engine.launch import prepare_output_dir, run_tool
from models import build_simmim, model_patch_size
from utils.errors import CheckpointError, ConfigError, IncompatibleCheckpointError
from utils.mask_grid import pixel_mask_to_patches
from utils.safe_load import load_checkpoint_file
from utils.state_dict import canonical_keys, unwrap_state_dict


def load_model(checkpoint_path, cfg=None, opts=()):
    """(config, SimMIM model with the checkpoint's weights) for `checkpoint_path`; the config is
    `cfg` if given, else the one stored in the checkpoint."""
    checkpoint = load_checkpoint_file(checkpoint_path, '--checkpoint')
    try:
        state_dict = canonical_keys(unwrap_state_dict(checkpoint))
    except IncompatibleCheckpointError as e:
        raise CheckpointError(f'--checkpoint {checkpoint_path}: {e}') from None
    if not any(k.startswith('decoder.') for k in state_dict):
        raise CheckpointError(
            f'--checkpoint {checkpoint_path} is not a SimMIM pre-training checkpoint: it has no '
            f'decoder (a fine-tuned or encoder-only checkpoint?), and reconstructions need one. '
            f'Pass a ckpt_epoch_*.pth written by main_simmim.py (or an official SimMIM one).'
        )
    config = checkpoint_config(checkpoint, cfg, opts, is_pretrain=True, source=checkpoint_path)
    model = build_simmim(config)
    load_full_state_dict(model, checkpoint, f'--checkpoint {checkpoint_path}')
    return config, model


def load_images(config, folder=None, num_images=8):
    """(N, 3, IMG_SIZE, IMG_SIZE) normalised images: the first `num_images` of `folder` (sorted), or
    of the synthetic validation set, resized (shorter side) and centre-cropped."""
    if folder:
        dataset = ImageFolderDataset(folder)
    else:
        syn = config.DATA.SYNTHETIC
        dataset = SyntheticShapes(
            num_images, syn.NUM_CLASSES, config.DATA.IMG_SIZE, syn.SEED, 'val'
        )
    size = config.DATA.IMG_SIZE
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), normalize()])
    return torch.stack([transform(dataset[i][0]) for i in range(min(num_images, len(dataset)))])


def random_masks(config, strategy, mask_patch_size, mask_ratio, count, seed):
    """(count, h, w) masks of a strategy at one mask patch size and ratio, mask i drawn from
    (seed, i)."""
    try:
        generator = build_mask_generator(
            config, model_patch_size(config), strategy, mask_patch_size, mask_ratio
        )
    except ValueError as e:  # the generator names the size or ratio that does not fit
        raise ConfigError(
            f'--mask-patch-size {mask_patch_size} / --mask-ratio {mask_ratio} with '
            f'{config.DATA.IMG_SIZE}-px images: {e}'
        ) from None
    return torch.stack(
        [
            generator(torch.Generator().manual_seed(sample_seed(seed, 0, i, 'mask')))
            for i in range(count)
        ]
    )


def mask_from_image(path, config):
    """(h, w) model-patch mask from a black-and-white image (white = masked), resized to the
    input."""
    size = config.DATA.IMG_SIZE
    try:
        grey = Image.open(path).convert('L').resize((size, size), Image.NEAREST)
    except OSError as e:
        raise ConfigError(
            f'--mask-image {path} cannot be read as an image ({e}). Pass a black-'
            f'and-white image (PNG), white = masked.'
        ) from None
    mask = pixel_mask_to_patches(np.asarray(grey) > 127, model_patch_size(config))
    return _masking_something(mask, f'--mask-image {path}')


def mask_from_box(box, config):
    """(h, w) model-patch mask of the pixel box (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    size = config.DATA.IMG_SIZE
    if not (x0 < x1 and y0 < y1):
        raise ConfigError(
            f'--box {x0} {y0} {x1} {y1} is empty: it needs x0 < x1 and y0 < y1 '
            f'(corners top-left then bottom-right, x1 and y1 exclusive).'
        )
    pixels = torch.zeros(size, size)
    pixels[max(y0, 0) : y1, max(x0, 0) : x1] = 1
    return _masking_something(
        pixel_mask_to_patches(pixels, model_patch_size(config)), f'--box {x0} {y0} {x1} {y1}'
    )


def _masking_something(mask, source):
    """`mask`, or a ConfigError when it masks no model patch (the grid would show no prediction)."""
    if not mask.any():
        raise ConfigError(
            f'{source} masks no model patch of the {tuple(mask.shape)} grid (a patch '
            f'is masked when at least half of its pixels are): mask a larger area '
            f'inside the image.'
        )
    return mask


def mask_settings(args, config, count):
    """[(file stem, (count, h, w) masks)] for the masks asked for."""
    if args.mask_image:
        return [('mask_image', mask_from_image(args.mask_image, config).expand(count, -1, -1))]
    if args.box:
        return [('box', mask_from_box(args.box, config).expand(count, -1, -1))]
    strategy = args.mask_strategy or config.DATA.MASK_STRATEGY
    return [
        (
            f'{strategy}_mask{size}_ratio{ratio:g}',
            random_masks(config, strategy, size, ratio, count, args.seed),
        )
        for size in args.mask_patch_size or [config.DATA.MASK_PATCH_SIZE]
        for ratio in args.mask_ratio or [config.DATA.MASK_RATIO]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--checkpoint', required=True, help='SimMIM pre-training checkpoint')
    parser.add_argument('--cfg', help='config (default: the one stored in the checkpoint)')
    parser.add_argument('--opts', nargs='+', action='extend', default=[], metavar='KEY VALUE')
    parser.add_argument('--images', help='image folder (default: synthetic validation images)')
    parser.add_argument('--num-images', type=int, default=8)
    parser.add_argument(
        '--mask-strategy', choices=sorted(MASK_GENERATORS), help='default: DATA.MASK_STRATEGY'
    )
    parser.add_argument(
        '--mask-patch-size',
        type=int,
        nargs='+',
        help='one grid per size (default: DATA.MASK_PATCH_SIZE)',
    )
    parser.add_argument(
        '--mask-ratio', type=float, nargs='+', help='one grid per ratio (default: DATA.MASK_RATIO)'
    )
    given = parser.add_mutually_exclusive_group()
    given.add_argument('--mask-image', help='black-and-white mask image, white = masked')
    given.add_argument(
        '--box',
        type=int,
        nargs=4,
        metavar=('X0', 'Y0', 'X1', 'Y1'),
        help='mask this pixel box (x1, y1 exclusive)',
    )
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--output', default='output/reconstructions', help='folder for the PNGs')
    args = parser.parse_args(argv)

    if args.num_images < 1:
        raise ConfigError(f'--num-images must be at least 1, got {args.num_images}.')
    config, model = load_model(args.checkpoint, args.cfg, args.opts)
    prepare_output_dir(args.output)
    model.to(args.device)
    images = load_images(config, args.images, args.num_images).to(args.device)
    for stem, masks in mask_settings(args, config, images.shape[0]):
        masks = masks.to(args.device)
        prediction = reconstruct_images(model, images, masks)
        path = os.path.join(args.output, f'{stem}.png')
        save_png(reconstruction_grid(images, masks, prediction), path)
        print(f'{path}: {masks.float().mean():.2f} of the patches masked')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
