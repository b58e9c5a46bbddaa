"""Reconstruction grids (Figures 4-6): original | masked input | prediction | prediction pasted into
the visible pixels, one row per image, de-normalised back to RGB. The prediction is turned into an
image by the model's target (`SimMIM.predict_image`), so the grid is right for every target. Used
by tools/visualize_reconstruction.py and the training callback (engine/callbacks.py)."""

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from models.targets import normalized_to_rgb
from utils.mask_grid import upsample_mask

MASK_GRAY = 0.5  # masked pixels are shown mid-grey in the "masked input" column
COLUMNS = ('original', 'masked input', 'prediction', 'prediction pasted')


def mask_to_pixels(mask, size):
    """(B, h, w) patch mask (1 = masked) -> (B, 1, H, W) float pixel mask for an H = `size`
    image."""
    return upsample_mask(mask, size // mask.shape[-1]).unsqueeze(1).float()


def reconstruction_grid(images, mask, prediction):
    """uint8 (3, H', W') grid from normalised `images` and predicted image `prediction` (both
    (B, 3, H, W)) and the patch `mask` (B, h, w). Columns: original, masked input, prediction,
    prediction pasted."""
    original = normalized_to_rgb(images.float())
    predicted = normalized_to_rgb(prediction.float())
    m = mask_to_pixels(mask, images.shape[-1]).to(original.device)
    masked = original * (1 - m) + MASK_GRAY * m
    pasted = original * (1 - m) + predicted * m
    rows = torch.stack([original, masked, predicted, pasted], dim=1).flatten(0, 1)
    grid = make_grid(rows.cpu(), nrow=4, padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8)


def with_column_labels(image, labels=COLUMNS):
    """`image` (a PIL grid of len(labels) columns) with a white strip on top naming each column."""
    column = image.width / len(labels)
    size = 20
    font = ImageFont.load_default(size=size)
    while size > 8 and max(font.getlength(label) for label in labels) > 0.9 * column:
        size -= 1
        font = ImageFont.load_default(size=size)
    height = size + 8
    labelled = Image.new('RGB', (image.width, image.height + height), 'white')
    labelled.paste(image, (0, height))
    draw = ImageDraw.Draw(labelled)
    for i, label in enumerate(labels):
        draw.text(((i + 0.5) * column, height / 2), label, fill='black', font=font, anchor='mm')
    return labelled


def save_png(grid, path, min_cell=0, labels=False):
    """Write the uint8 (3, H, W) `grid` as a PNG. With `min_cell`, grids of small images (e.g. the
    64-px demo) are enlarged by an integer factor (nearest neighbour) so each cell is at least
    `min_cell` pixels wide; with `labels`, a strip on top names the columns."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy().astype(np.uint8))
    cell = (image.width - 2) // 4  # four columns with 2-px padding
    factor = -(-min_cell // max(cell, 1))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    (with_column_labels(image) if labels else image).save(path)


@torch.no_grad()
def reconstruct_images(model, images, mask):
    """The model's prediction as a normalised image (B, 3, H, W) for (images, mask), in eval
    mode."""
    was_training = model.training
    model.eval()
    try:
        return model.predict_image(images, mask)
    finally:
        model.train(was_training)
