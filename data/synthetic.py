"""A built-in dataset needing no download: one coloured shape per image on a textured background,
class = shape type. Enough structure for pre-training to learn and for a fine-tuned classifier to
beat chance, so the whole pipeline can be tried on a laptop."""

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .seeding import sample_seed

SHAPES = (
    'circle',
    'square',
    'triangle',
    'cross',
    'ring',
    'star',
    'stripes',
    'checker',
    'diamond',
    'dots',
)


@functools.lru_cache(maxsize=8)
def _pixel_grid(size):
    """(y, x) pixel-centre coordinates, float32 (size, size) each."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords, indexing='ij')


def _polygon(size, points, cx, cy, angle):
    """Mask of a polygon given in shape-local coordinates, rotated by `angle` about (cx, cy)."""
    cos, sin = math.cos(angle), math.sin(angle)
    xy = [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]
    canvas = Image.new('L', (size, size), 0)
    ImageDraw.Draw(canvas).polygon(xy, fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _star_points(r, num_tips=5, inner=0.45):
    return [
        (
            (r if k % 2 == 0 else inner * r) * math.cos(k * math.pi / num_tips),
            (r if k % 2 == 0 else inner * r) * math.sin(k * math.pi / num_tips),
        )
        for k in range(2 * num_tips)
    ]


def _cross_points(r, half_width):
    w = half_width
    return [
        (-w, -r),
        (w, -r),
        (w, -w),
        (r, -w),
        (r, w),
        (w, w),
        (w, r),
        (-w, r),
        (-w, w),
        (-r, w),
        (-r, -w),
        (-w, -w),
    ]


def _shape_mask(shape, size, cx, cy, r, rng):
    """Float mask in [0, 1], (size, size), of one shape centred at (cx, cy) with radius r."""
    y, x = _pixel_grid(size)
    dx, dy = x - cx, y - cy
    angle = rng.uniform(0, 2 * math.pi)
    tilt = rng.uniform(-math.pi / 12, math.pi / 12)  # square and diamond stay told apart
    if shape == 'circle':
        return (dx * dx + dy * dy <= r * r).astype(np.float32)
    if shape == 'ring':
        dist2 = dx * dx + dy * dy
        return ((dist2 <= r * r) & (dist2 >= (0.55 * r) ** 2)).astype(np.float32)
    if shape == 'square':
        s = 0.8 * r
        return _polygon(size, [(-s, -s), (s, -s), (s, s), (-s, s)], cx, cy, tilt)
    if shape == 'diamond':
        return _polygon(size, [(0, -r), (0.65 * r, 0), (0, r), (-0.65 * r, 0)], cx, cy, tilt)
    if shape == 'triangle':
        return _polygon(
            size,
            [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)],
            cx,
            cy,
            angle,
        )
    if shape == 'star':
        return _polygon(size, _star_points(r), cx, cy, angle)
    if shape == 'cross':
        return _polygon(size, _cross_points(r, 0.3 * r), cx, cy, angle)

    # Textured squares: the pattern, not the outline, tells these classes apart.
    inside = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == 'stripes':
        period = rng.uniform(0.3, 0.5) * r
        along = dx * math.cos(angle) + dy * math.sin(angle)
        pattern = np.floor(along / period) % 2 == 0
    elif shape == 'checker':
        cell = 2 * 0.85 * r / rng.integers(3, 6)
        pattern = (np.floor(dx / cell) + np.floor(dy / cell)) % 2 == 0
    elif shape == 'dots':
        period = rng.uniform(0.45, 0.6) * r
        px, py = dx % period - period / 2, dy % period - period / 2
        pattern = px * px + py * py <= (0.3 * period) ** 2
    else:
        raise ValueError(f'Unknown shape {shape!r}')
    return (inside & pattern).astype(np.float32)


class SyntheticShapes(torch.utils.data.Dataset):
    """`num_images` images of `image_size` pixels; image `index` shows shape SHAPES[index %
    num_classes] and is generated on the fly from its own RNG, seeded by (seed, split, index)."""

    def __init__(self, num_images, num_classes, image_size, seed=0, split='train'):
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(
                f'SyntheticShapes supports 1 to {len(SHAPES)} classes '
                f'({", ".join(SHAPES)}), got {num_classes}; set '
                f'DATA.SYNTHETIC.NUM_CLASSES accordingly.'
            )
        if num_images < 1 or image_size < 8:
            raise ValueError(
                f'SyntheticShapes needs num_images >= 1 and image_size >= 8, got '
                f'{num_images} and {image_size}.'
            )
        self.num_images, self.image_size = num_images, image_size
        self.seed, self.split = seed, split
        self.classes = list(SHAPES[:num_classes])

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f'index {index} out of range for {self.num_images} images')
        label = index % len(self.classes)  # balanced classes
        # The images do not change over epochs: epoch 0 of their own stream.
        rng = np.random.default_rng(sample_seed(self.seed, 0, index, f'synthetic/{self.split}'))
        return self.render(self.classes[label], rng), label

    def render(self, shape, rng):
        """A PIL RGB image of `shape` drawn with random colours, placement and background."""
        size = self.image_size
        y, x = _pixel_grid(size)
        # Background: a linear gradient between two colours plus a low-frequency wave.
        base = rng.uniform(0, 255, 3).astype(np.float32)
        other = np.clip(base + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
        direction = rng.uniform(0, 2 * math.pi)
        ramp = (x * math.cos(direction) + y * math.sin(direction)) / (size * math.sqrt(2)) + 0.5
        wave = 15 * np.sin(
            2 * math.pi * rng.uniform(0.5, 3) * (x * rng.uniform(-1, 1) + y) / size
            + rng.uniform(0, 2 * math.pi)
        )
        image = base + (other - base) * ramp[..., None] + wave[..., None]

        # Foreground colour far enough from the background's mean colour to be visible.
        background_mean = (base + other) / 2
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if np.abs(colour - background_mean).max() < 90:
            colour = np.where(background_mean > 127, background_mean - 110, background_mean + 110)

        r = rng.uniform(0.2, 0.35) * size
        cx, cy = rng.uniform(r, size - r, 2)
        mask = _shape_mask(shape, size, cx, cy, r, rng)[..., None]
        image = image * (1 - mask) + colour * mask
        image += rng.standard_normal(image.shape, dtype=np.float32) * 6
        return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), 'RGB')
