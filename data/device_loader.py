"""Batches finished in the main process, on the training device.

A DataLoader's workers can hand over less than the model's input (8-bit crops, or encoded JPEGs and
their crop plans); `DeviceLoader` wraps that DataLoader and turns each batch into the (images,
mask, label) of the CPU pipeline on the device, exposing the `sampler`, `dataset` and len() that
the training loop uses.
"""

import torch

from .pretrain_transform import normalize_pixels


def training_device():
    """The device this process trains on: its current CUDA GPU (utils.distributed.init_distributed
    sets it), or the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


class DeviceLoader:
    """Iterates `loader`, yielding `finish(batch, device)` for each of its batches."""

    def __init__(self, loader, finish, device):
        self.loader, self.finish, self.device = loader, finish, torch.device(device)
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.finish(batch, self.device)


def normalize_batch(batch, device):
    """(uint8 images (B, 3, H, W), masks, labels) from the workers -> (normalised float32 images,
    int64 masks) on `device` and the labels: what MaskedImageDataset's own samples collate to."""
    images, masks, labels = batch
    images = normalize_pixels(images.to(device, non_blocking=True))
    return images, masks.to(device, non_blocking=True).long(), labels
