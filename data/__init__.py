"""Data for SimMIM pre-training and fine-tuning: `build_pretrain_data` / `build_finetune_data`
(and the official `build_loader(config, logger, is_pretrain)`)."""
from .datasets import (BadImageError, ImageFolderDataset, MaskedImageDataset,
                       SeededTransformDataset, load_image)
from .loader import (FinetuneData, PretrainData, build_finetune_data, build_loader,
                     build_pretrain_data, rank_and_world_size)
from .masking import MASK_GENERATORS, MaskGenerator, build_mask_generator
from .sampler import EvalDistributedSampler, ResumableDistributedSampler
from .seeding import sample_seed, seeded_global_rngs
from .synthetic import SHAPES, SyntheticShapes
from .pretrain_transform import build_pretrain_transform
from .transforms import build_finetune_transform, to_rgb
