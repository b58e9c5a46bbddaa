"""DATA.DECODE gpu: pre-training JPEGs decoded and augmented on the GPU.

DataLoader workers only read each file, parse its header and draw the crop and flip (the plan of
data/pretrain_transform.py, from the same (seed, epoch, index)-seeded draws as the CPU path) and the
mask; the main process decodes the whole batch with nvJPEG (torchvision.io.decode_jpeg on the
device), then crops, resizes (bilinear, antialiased, rounded to 8 bits as PIL does), flips and
normalises there. Crops, flips and masks are those of DATA.DECODE cpu, so resume stays exact; the
pixels differ from PIL's by the decoders' rounding and the resize filter's implementation (tested
close on the CPU, where the same code runs with torchvision's CPU decoder).

Files that are not baseline RGB/grey JPEGs (PNG, CMYK JPEG, ...) are decoded by PIL in the worker
and handed over as pixels; a JPEG the GPU decoder rejects is decoded by PIL in the main process.
"""

import io
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from utils.errors import BadImageError, ConfigError

from .datasets import ImageFileDataset, MaskedImageDataset, _split_key, load_image, open_image_file
from .device_loader import DeviceLoader, training_device
from .pretrain_transform import normalize_pixels
from .transforms import to_rgb


class EncodedImage(NamedTuple):
    """What a worker hands over: `data` is the JPEG file (1-D uint8) or decoded RGB pixels
    (3, H, W) uint8; `size` is (W, H)."""

    data: torch.Tensor
    size: tuple
    path: str


def read_encoded(path, rgb_conversion='careful', before_decode=None):
    """The file at `path` as an EncodedImage: JPEG bytes as they are, anything else decoded to RGB
    pixels by PIL (transforms.to_rgb with `rgb_conversion`). `before_decode(header_image)` runs
    first, as for data.datasets.load_image."""
    with open_image_file(path) as f:
        data = f.read()
    image = Image.open(io.BytesIO(data))
    if before_decode is not None:
        before_decode(image)
    if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), image.size, path)
    image.load()
    pixels = torch.from_numpy(np.array(to_rgb(image, rgb_conversion))).permute(2, 0, 1).contiguous()
    return EncodedImage(pixels, image.size, path)


class EncodedMaskedImageDataset(MaskedImageDataset):
    """Pre-training samples for GPU decoding: (EncodedImage, plan (top, left, height, width, flip)
    as an int64 tensor, mask, label), plan and mask drawn exactly as MaskedImageDataset draws
    them."""

    def __getitem__(self, key):
        epoch, index = _split_key(key)
        item, label, (plan, _) = self.planned_load(epoch, index, reader=read_encoded, draft=False)
        return item, torch.tensor(plan, dtype=torch.int64), self.mask(epoch, index), label


def collate_encoded(samples):
    """Batch EncodedMaskedImageDataset samples: (list of data tensors, list of paths, plans (B, 5),
    masks (B, h, w), labels (B,)); the DataLoader pins the tensors in the lists too."""
    items, plans, masks, labels = zip(*samples, strict=True)
    return (
        [item.data for item in items],
        [item.path for item in items],
        torch.stack(plans),
        torch.stack(masks),
        torch.tensor(labels, dtype=torch.int64),
    )


def _decode_jpegs(datas, paths, device):
    """uint8 (3, H, W) images on `device`; a file the batch decode rejects is decoded alone, and
    by PIL if the device decoder still refuses it."""
    try:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = []
        for data, path in zip(datas, paths, strict=True):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    pixels = np.array(load_image(path))
                except Exception as err:  # PIL raises many types for broken files
                    raise BadImageError(
                        f'Cannot decode image {path} ({type(err).__name__}: {err}). Fix or remove '
                        f'the file, or use DATA.DECODE cpu, which skips unreadable images '
                        f'(DATA.ON_BAD_IMAGE skip).'
                    ) from err
                images.append(torch.from_numpy(pixels).permute(2, 0, 1).to(device))
        return images


def decode_batch(datas, paths, plans, size, device):
    """Normalised float images (B, 3, size, size) on `device` from a collated batch."""
    jpeg = [i for i, data in enumerate(datas) if data.dim() == 1]
    images = [None] * len(datas)
    decoded = (
        _decode_jpegs([datas[i] for i in jpeg], [paths[i] for i in jpeg], device) if jpeg else []
    )
    for i, image in zip(jpeg, decoded, strict=True):
        images[i] = image
    for i, data in enumerate(datas):
        if images[i] is None:
            images[i] = data.to(device, non_blocking=True)
    out = []
    for image, (top, left, height, width, flip) in zip(images, plans.tolist(), strict=True):
        crop = (
            TF.resized_crop(image.float(), top, left, height, width, [size, size], antialias=True)
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
        )
        out.append(crop.flip(-1) if flip else crop)
    return normalize_pixels(torch.stack(out))


def build_device_decode_loader(config, dataset, make_loader):
    """The DATA.DECODE gpu loader for the CPU pipeline's `dataset` (whose image folder, transform
    and mask generator it reuses); `make_loader(dataset, collate_fn)` builds the DataLoader as for
    the CPU pipeline."""
    if not torch.cuda.is_available():
        raise ConfigError(
            'DATA.DECODE gpu decodes JPEGs on a CUDA GPU, and none is available. Use '
            'DATA.DECODE cpu (the default).'
        )
    base = dataset.base
    if not isinstance(base, ImageFileDataset):
        raise ConfigError(
            f'DATA.DECODE gpu reads JPEG files or shards from DATA.DATA_PATH; DATA.DATASET '
            f"'{config.DATA.DATASET}' has none. Use DATA.DECODE cpu."
        )
    encoded = EncodedMaskedImageDataset(
        base, dataset.transform, dataset.mask_generator, dataset.seed
    )
    size = config.DATA.IMG_SIZE

    def decode(batch, device):
        datas, paths, plans, masks, labels = batch
        return decode_batch(datas, paths, plans, size, device), masks, labels

    return DeviceLoader(make_loader(encoded, collate_encoded), decode, training_device())
