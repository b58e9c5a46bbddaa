"""Datasets, samplers and DataLoaders for pre-training and fine-tuning.

build_pretrain_data(config, model_patch_size, logger) -> PretrainData
build_finetune_data(config, logger)                   -> FinetuneData
build_loader(config, logger, is_pretrain)             the official tuples, from the two above
"""

import functools
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode

from models.registry import model_patch_size
from utils.errors import ConfigError, DataError, require
from utils.registry import require_choice
from utils.tasks import PRETRAIN, Task, as_task

from .datasets import ImageFolderDataset, MaskedImageDataset, SeededTransformDataset
from .device_loader import DeviceLoader, normalize_batch, training_device
from .gpu_decode import build_device_decode_loader
from .masking import build_mask_generator
from .pretrain_transform import build_pretrain_transform, check_resize_backend
from .sampler import EvalDistributedSampler, ResumableDistributedSampler, ShardWindowSampler
from .seeding import sample_seed
from .shards import ShardDataset, align_classes, find_shards, is_shard_source
from .synthetic import SyntheticShapes
from .transforms import build_finetune_transform
from .worker_signals import shield_worker, worker_start_context

DECODERS = ('cpu', 'gpu')  # DATA.DECODE
SHARD_SHUFFLES = ('global', 'window')  # DATA.SHARD_SHUFFLE


def rank_and_world_size():
    """(rank, world size) from torch.distributed when initialised, else RANK/WORLD_SIZE, else (0,
    1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))


def seed_worker(worker_id, main_pid=None):
    """Seed a worker's global RNGs from its torch seed (loader generator + worker id), for anything
    drawn outside the per-sample seeding; leave stop signals to the main process `main_pid`, which
    stops cleanly (see data/worker_signals.shield_worker)."""
    shield_worker(main_pid)
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _image_source(config, logger, split=None):
    """The images of DATA.DATA_PATH: an image folder or tar shards (detected from the path), for
    `split` (None: all of it, for pre-training; 'train' or 'val')."""
    data = config.DATA
    if not data.DATA_PATH:
        raise ConfigError(
            f"DATA.DATA_PATH is empty but DATA.DATASET is '{data.DATASET}': pass "
            f'--data-path DIR (a folder of images or of .tar shards) or use the built-in dataset '
            f'with --opts DATA.DATASET synthetic.'
        )
    if is_shard_source(data.DATA_PATH):
        shards, info = find_shards(data.DATA_PATH, split)
        dataset = ShardDataset(
            shards,
            info,
            data.ON_BAD_IMAGE,
            min_size=data.IMG_SIZE,
            rgb_conversion=data.RGB_CONVERSION,
            cache_dir=data.SHARD_INDEX_CACHE,
            require_labels=split is not None,
            root=data.DATA_PATH,
        )
        logger.info(
            f'Data format: tar shards; {split or "all"}: {len(shards)} shards, {len(dataset)} '
            f'samples, from {data.DATA_PATH}' + (f' (classes and counts: {info})' if info else '')
        )
        return dataset
    dataset = ImageFolderDataset(
        os.path.join(data.DATA_PATH, split or ''),
        data.ON_BAD_IMAGE,
        min_size=data.IMG_SIZE,
        rgb_conversion=data.RGB_CONVERSION,
    )
    logger.info(
        f'Data format: image folder; {split or "all"}: {len(dataset)} images, from {dataset.root}'
    )
    return dataset


def _train_sampler(config, base, world_size, rank):
    """The training sampler: the global permutation, or for shards with DATA.SHARD_SHUFFLE window
    the one that reads DATA.SHARD_WINDOW shards at a time."""
    if config.DATA.SHARD_SHUFFLE == 'window' and hasattr(base, 'shard_lengths'):
        return ShardWindowSampler(
            base.shard_lengths, config.DATA.SHARD_WINDOW, world_size, rank, True, config.SEED
        )
    return ResumableDistributedSampler(len(base), world_size, rank, True, config.SEED)


def _synthetic(config, split):
    syn = config.DATA.SYNTHETIC
    num_images = syn.TRAIN_SIZE if split == 'train' else syn.VAL_SIZE
    return SyntheticShapes(num_images, syn.NUM_CLASSES, config.DATA.IMG_SIZE, syn.SEED, split)


def _check_batch_size(config, sampler):
    per_rank = sampler.num_samples  # this rank's training samples per epoch
    if config.DATA.BATCH_SIZE > per_rank:
        raise ConfigError(
            f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is larger than each process's share of the "
            f'training data ({sampler.dataset_len} images over world size {sampler.num_replicas} = '
            f'{per_rank} per process), so drop_last would leave no batch. Lower --batch-size to at '
            f'most {per_rank}, or use more data (DATA.SYNTHETIC.TRAIN_SIZE for the synthetic set).'
        )


def _check_classes(config, train_set, val_set):
    train_classes, val_classes = list(train_set.classes), list(val_set.classes)
    if not train_classes:
        raise DataError(
            f'Fine-tuning needs class sub-folders (DATA_PATH/train/CLASS/NAME.jpg), '
            f'but {train_set.root} holds images directly.'
        )
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f'The train and val folders must have the same class sub-folders: train has '
            f'{len(train_classes)}, val {len(val_classes)}; only in train: {only_train[:10]}, only '
            f'in val: {only_val[:10]}. (Class sub-folders without images do not count.)'
        )
    num_classes = len(train_classes)
    if config.MODEL.NUM_CLASSES not in (0, num_classes):
        raise ConfigError(
            f'MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES} but the data has {num_classes} '
            f'classes. Set --opts MODEL.NUM_CLASSES {num_classes}, or MODEL.NUM_CLASSES 0 to take '
            f'the count from the data.'
        )
    return num_classes


def check_loader_config(config, task):
    """DATA.DECODE, DATA.RESIZE_BACKEND, DATA.PREFETCH_FACTOR, DATA.SHARD_SHUFFLE and
    DATA.SHARD_WINDOW."""
    data = config.DATA
    require_choice('DATA.DECODE', data.DECODE, DECODERS, 'decoders')
    check_resize_backend(data.RESIZE_BACKEND)
    require_choice('DATA.SHARD_SHUFFLE', data.SHARD_SHUFFLE, SHARD_SHUFFLES, 'choices')
    require(
        data.SHARD_WINDOW >= 1,
        f'DATA.SHARD_WINDOW must be at least 1 shard, got {data.SHARD_WINDOW}.',
    )
    require(
        data.DECODE == 'cpu' or task.masked_image_modeling,
        'DATA.DECODE gpu is for pre-training; fine-tuning augments with PIL (RandAugment). Use '
        'DATA.DECODE cpu.',
    )
    require(data.PREFETCH_FACTOR >= 1, 'DATA.PREFETCH_FACTOR must be >= 1.')


def _data_loader(config, dataset, sampler, rank, drop_last, collate_fn=None):
    data = config.DATA
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=data.BATCH_SIZE,
        num_workers=data.NUM_WORKERS,
        pin_memory=data.PIN_MEMORY and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=data.PERSISTENT_WORKERS and data.NUM_WORKERS > 0,
        prefetch_factor=data.PREFETCH_FACTOR if data.NUM_WORKERS > 0 else None,
        collate_fn=collate_fn,
        worker_init_fn=functools.partial(seed_worker, main_pid=os.getpid()),
        multiprocessing_context=worker_start_context(data.NUM_WORKERS),
        # Its own generator: worker seeds do not consume (or depend on) the training RNG.
        generator=torch.Generator().manual_seed(sample_seed(config.SEED, 0, rank, 'loader')),
    )


@dataclass
class PretrainData:
    """Batches [img (B,3,H,W) float, mask (B,H/p,W/p) int64 with 1 = masked, label (B,) int64];
    the loader is a data.device_loader.DeviceLoader when the main process finishes the batches
    (DATA.NORMALIZE_ON_DEVICE, DATA.DECODE gpu), which puts images and masks on the device."""

    train_set: MaskedImageDataset
    train_loader: DataLoader | DeviceLoader


@dataclass
class FinetuneData:
    """Batches [img (B,3,H,W), label (B,)]; mixup_fn is a timm Mixup or None."""

    train_set: Dataset
    val_set: Dataset
    train_loader: DataLoader
    val_loader: DataLoader
    mixup_fn: Mixup | None
    num_classes: int


def _source(config):
    return 'the synthetic dataset' if config.DATA.DATASET == 'synthetic' else config.DATA.DATA_PATH


def build_pretrain_data(
    config: CfgNode, model_patch_size: int, logger: logging.Logger | None = None
) -> PretrainData:
    """Masked training images; the masks are drawn at `model_patch_size`, the encoder's patch
    size in pixels (models.model_patch_size(config))."""
    logger = logger or logging.getLogger('simmim.data')
    rank, world_size = rank_and_world_size()
    synthetic = config.DATA.DATASET == 'synthetic'
    base = _synthetic(config, 'train') if synthetic else _image_source(config, logger)
    if isinstance(base, ImageFolderDataset) and {'train', 'val'} <= set(base.classes):
        logger.warning(
            f'DATA.DATA_PATH {config.DATA.DATA_PATH} holds train/ and val/ '
            f'sub-folders, so pre-training reads both (every image under it). '
            f'Pass DATA_PATH/train to pre-train on the training split only.'
        )
    sampler = _train_sampler(config, base, world_size, rank)
    _check_batch_size(config, sampler)
    mask_generator = build_mask_generator(config, model_patch_size)
    dataset_train = MaskedImageDataset(
        base, build_pretrain_transform(config), mask_generator, config.SEED
    )
    logger.info(f'Pre-training data: {len(base)} images from {_source(config)}; {mask_generator}')
    if config.DATA.DECODE == 'gpu':
        return PretrainData(
            dataset_train,
            build_device_decode_loader(
                config,
                dataset_train,
                lambda dataset, collate: _data_loader(
                    config, dataset, sampler, rank, True, collate
                ),
            ),
        )
    # uint8 through the workers, normalised in this process (a transform put in place of the
    # PretrainTransform, with no 8-bit pixels to hand over, is left to the workers)
    if config.DATA.NORMALIZE_ON_DEVICE and hasattr(dataset_train.transform, 'pixels'):
        handed_over = dataset_train.handing_over_pixels()
        loader = _data_loader(config, handed_over, sampler, rank, drop_last=True)
        return PretrainData(dataset_train, DeviceLoader(loader, normalize_batch, training_device()))
    return PretrainData(
        dataset_train, _data_loader(config, dataset_train, sampler, rank, drop_last=True)
    )


def build_finetune_data(config: CfgNode, logger: logging.Logger | None = None) -> FinetuneData:
    """Labelled train and val images (class sub-folders, or the synthetic set), with
    Mixup/CutMix."""
    logger = logger or logging.getLogger('simmim.data')
    rank, world_size = rank_and_world_size()
    synthetic = config.DATA.DATASET == 'synthetic'
    source = _source(config)
    if synthetic:
        train_base, val_base = _synthetic(config, 'train'), _synthetic(config, 'val')
    else:
        train_base = _image_source(config, logger, 'train')
        val_base = _image_source(config, logger, 'val')
        if isinstance(train_base, ShardDataset) and isinstance(val_base, ShardDataset):
            align_classes(train_base, val_base)
    num_classes = _check_classes(config, train_base, val_base)
    train_sampler = _train_sampler(config, train_base, world_size, rank)
    _check_batch_size(config, train_sampler)
    dataset_train = SeededTransformDataset(
        train_base, build_finetune_transform(config, True), config.SEED
    )
    dataset_val = SeededTransformDataset(
        val_base, build_finetune_transform(config, False), config.SEED
    )
    val_sampler = EvalDistributedSampler(len(val_base), world_size, rank)
    logger.info(
        f'Fine-tuning data from {source}: {len(train_base)} train / {len(val_base)} val '
        f'images, {num_classes} classes'
    )

    aug = config.AUG
    mixup_fn = None
    if aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None:
        mixup_fn = Mixup(
            mixup_alpha=aug.MIXUP,
            cutmix_alpha=aug.CUTMIX,
            cutmix_minmax=aug.CUTMIX_MINMAX,
            prob=aug.MIXUP_PROB,
            switch_prob=aug.MIXUP_SWITCH_PROB,
            mode=aug.MIXUP_MODE,
            label_smoothing=config.MODEL.LABEL_SMOOTHING,
            num_classes=num_classes,
        )
        if config.DATA.BATCH_SIZE % 2:  # timm Mixup mixes each sample with its mirror in the batch
            raise ConfigError(
                f'Mixup/CutMix needs an even DATA.BATCH_SIZE, got '
                f'{config.DATA.BATCH_SIZE}; change --batch-size, or turn them off with '
                f'--opts AUG.MIXUP 0 AUG.CUTMIX 0.'
            )
    return FinetuneData(
        dataset_train,
        dataset_val,
        _data_loader(config, dataset_train, train_sampler, rank, drop_last=True),
        _data_loader(config, dataset_val, val_sampler, rank, drop_last=False),
        mixup_fn,
        num_classes,
    )


def build_loader(
    config: CfgNode,
    logger: logging.Logger | None = None,
    task: Task | bool = PRETRAIN,
    *,
    is_pretrain: bool | None = None,
) -> tuple:
    """The official interface: pre-training (dataset_train, data_loader_train); fine-tuning
    (dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn, num_classes).
    `task` may be the official `is_pretrain` flag. New code calls the two builders above."""
    if not as_task(task, is_pretrain).masked_image_modeling:
        data = build_finetune_data(config, logger)
        return (
            data.train_set,
            data.val_set,
            data.train_loader,
            data.val_loader,
            data.mixup_fn,
            data.num_classes,
        )
    # The official signature has no patch size: the model registry gives it (the builders above
    # take it as an argument).
    data = build_pretrain_data(config, model_patch_size(config), logger)
    return data.train_set, data.train_loader
