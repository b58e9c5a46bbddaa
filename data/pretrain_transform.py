"""The SimMIM pre-training image transform (§3.2: random resized crop and flip, nothing else),
split into a random *plan* drawn from the image's size and its deterministic *application*.

The split lets a JPEG be decoded after its crop is known: when the crop box is at least r times
the output size in both directions (r = 2, 4 or 8), the image is decoded at 1/r scale (PIL's
draft mode: libjpeg scales in the DCT, several times faster than a full decode) and the same box,
divided by r, is resized from the smaller image (DATA.JPEG_DRAFT). Its exact semantics:

- the plan (box and flip) is drawn first, from the full-size dimensions in the JPEG header, with
  the same seeded draws as torchvision's RandomResizedCrop then RandomHorizontalFlip, so every
  crop and flip is what the full decode would give;
- r is the largest of 8, 4, 2 with box_width / r >= IMG_SIZE and box_height / r >= IMG_SIZE, so
  the final resize still shrinks (never enlarges) the crop; r = 1 means a full decode;
- the box maps to the reduced image as x / r exactly (float coordinates, PIL's resize `box`;
  without a reduction the box is cropped, then resized, as torchvision does).
The pixels then differ from a full decode only by the filtering: the DCT's block averaging and a
bilinear shrink by factor f / r, instead of a bilinear shrink by f (measured and tested in
tests/test_pretrain_transform.py). Images that are not JPEG, and crops smaller than 2 x IMG_SIZE
(most ImageNet crops at 192: its typical 500x375 images allow no reduction), are decoded in full.

The crop's 8-bit pixels (`pixels`) are what DataLoader workers hand over
(DATA.NORMALIZE_ON_DEVICE): a quarter of the bytes of float32. `normalize_pixels` turns them into
the model's input on any device, bit-identical to torchvision's ToTensor and Normalize on the CPU.
The resize is PIL's (DATA.RESIZE_BACKEND pil: torchvision's resized_crop on a PIL image, bit for
bit) or torchvision's antialiased bilinear resize of the uint8 tensor ('tensor': about 4x faster;
at most 1 of 255 from PIL's, on under 1 % of the values, tested; on x86 CPUs without AVX2,
torchvision resizes in float32 and rounds: at most 1 apart on about 14 % of them).
"""

import functools
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from yacs.config import CfgNode

from utils.registry import require_choice

from .transforms import to_rgb

JPEG_REDUCTIONS = (8, 4, 2)  # the scales libjpeg can decode at directly
_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32).view(3, 1, 1)
# normalised value of 8-bit value v in channel c at [c, v]: ToTensor's v / 255, then Normalize
_NORMALISED = (
    torch.arange(256, dtype=torch.float32).div(255).expand(3, 256).sub(_MEAN[:, 0]).div(_STD[:, 0])
)
_CHANNEL_ROWS = (torch.arange(3, dtype=torch.int32) * 256).view(3, 1, 1)
RESIZE_BACKENDS = ('pil', 'tensor')  # DATA.RESIZE_BACKEND


def check_resize_backend(value):
    require_choice('DATA.RESIZE_BACKEND', value, RESIZE_BACKENDS, 'backends')


def normalize_pixels(pixels):
    """uint8 RGB images (..., 3, H, W) -> float32 model input on their device: (v / 255 - mean) /
    std per channel, bit-identical to torchvision's ToTensor + Normalize on the CPU on any device.
    On the CPU these are its operations (10x faster than a lookup there); elsewhere a lookup in
    the table they computed, because CUDA divides by a scalar as a product with its reciprocal,
    which can round differently."""
    if pixels.device.type == 'cpu':
        return pixels.float().div_(255).sub_(_MEAN).div_(_STD)
    return looked_up(pixels)


def looked_up(pixels):
    """normalize_pixels through the table, on the device of `pixels`."""
    table, rows = _table_on(pixels.device)
    return table[pixels.int() + rows]


@functools.cache
def _table_on(device):
    """The flat table and channel offsets, copied to `device` once: a copy from pageable memory
    at every batch would wait for the GPU's queued work."""
    return _NORMALISED.to(device).view(-1), _CHANNEL_ROWS.to(device)


class CropPlan(NamedTuple):
    """Where to crop (in full-size pixels) and whether to flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class PretrainTransform:
    """PIL image -> normalised (3, size, size) tensor: RandomResizedCrop(size, scale, ratio) with
    bilinear resizing, horizontal flip with probability 1/2, ImageNet normalisation.

    `transform(img)` converts to RGB (DATA.RGB_CONVERSION), draws the plan from the global RNGs
    (seeded per sample by the dataset) and applies it: the same draws as the torchvision Compose of
    these steps, and with resize 'pil' the same pixels (see the module docstring for 'tensor').
    """

    def __init__(
        self,
        size,
        scale=(0.67, 1.0),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        jpeg_draft=False,
        rgb_conversion='careful',
        resize='pil',
    ):
        check_resize_backend(resize)
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.jpeg_draft, self.rgb_conversion, self.resize = jpeg_draft, rgb_conversion, resize

    def plan(self, size):
        """Draw the crop box and the flip for an image of `size` (W, H), e.g. from its header, from
        torch's global RNG only (the datasets seed just that one for it: data.seeding)."""
        shape_only = torch.empty(0, size[1], size[0], device='meta')  # get_params reads its shape
        top, left, height, width = T.RandomResizedCrop.get_params(
            shape_only, self.scale, self.ratio
        )
        flip = bool(torch.rand(1) < 0.5)  # as RandomHorizontalFlip draws it
        return CropPlan(top, left, height, width, flip)

    def reduction(self, plan):
        """The JPEG decode scale 1/r allowed for `plan` (see the module docstring); 1 = none."""
        if not self.jpeg_draft:
            return 1
        return next(
            (r for r in JPEG_REDUCTIONS if min(plan.width, plan.height) >= r * self.size), 1
        )

    def crop_resize(self, image, plan, reduction=1):
        """The plan's box, cut from `image` decoded at 1/reduction scale, resized to size x size."""
        box = (plan.left, plan.top, plan.left + plan.width, plan.top + plan.height)
        if reduction == 1:  # crop, then resize: torchvision's resized_crop, bit for bit
            return image.crop(box).resize((self.size, self.size), Image.BILINEAR)
        # A box with fractional corners: PIL resamples it from the reduced image directly.
        box = tuple(coordinate / reduction for coordinate in box)
        return image.resize((self.size, self.size), Image.BILINEAR, box=box)

    def pixels(self, image, plan, reduction=1):
        """The planned crop of `image` (decoded at 1/reduction scale), resized and flipped, as uint8
        (3, size, size). With resize 'tensor', a crop of a full decode is resized by torchvision's
        uint8 kernel; a reduced decode's fractional box is always resized by PIL."""
        if self.resize == 'tensor' and reduction == 1:
            box = (plan.left, plan.top, plan.left + plan.width, plan.top + plan.height)
            crop = torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1)
            pixels = TF.resize(crop, [self.size, self.size], antialias=True)
        else:
            pixels = torch.from_numpy(np.array(self.crop_resize(image, plan, reduction)))
            pixels = pixels.permute(2, 0, 1)
        return (pixels.flip(-1) if plan.flip else pixels).contiguous()

    def apply(self, image, plan, reduction=1):
        """The normalised float (3, size, size) model input: `pixels`, normalised."""
        return normalize_pixels(self.pixels(image, plan, reduction))

    def __call__(self, image):
        image = to_rgb(image, self.rgb_conversion)
        return self.apply(image, self.plan(image.size))

    def __repr__(self):
        return (
            f'PretrainTransform(RandomResizedCrop({self.size}, scale={self.scale}, '
            f'ratio=({self.ratio[0]:.3f}, {self.ratio[1]:.3f}), bilinear), flip 0.5, normalize, '
            f'jpeg_draft={self.jpeg_draft}, resize={self.resize!r})'
        )


def draft_jpeg(image, reduction):
    """Ask PIL to decode the not yet loaded `image` at 1/reduction scale; returns the scale it
    will decode at (1 for anything but a JPEG)."""
    if reduction <= 1 or image.format != 'JPEG':
        return 1
    width, height = image.size
    result = image.draft(image.mode, (width // reduction, height // reduction))
    if result is None:
        return 1
    return int(round(width / result[1][2]))


def build_pretrain_transform(config: CfgNode) -> 'PretrainTransform':
    """The SimMIM pre-training image transform (the image half of the official SimMIMTransform; the
    mask is drawn separately, see data.masking): PIL image -> normalised (3, IMG_SIZE, IMG_SIZE).
    Nothing beyond crop and flip (§3.2)."""
    return PretrainTransform(
        config.DATA.IMG_SIZE,
        scale=(0.67, 1.0),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        jpeg_draft=config.DATA.JPEG_DRAFT,
        rgb_conversion=config.DATA.RGB_CONVERSION,
        resize=config.DATA.RESIZE_BACKEND,
    )
