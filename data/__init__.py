"""Data for SimMIM pre-training and fine-tuning: `build_pretrain_data` / `build_finetune_data`
(and the official `build_loader(config, logger, is_pretrain)`); the units are in the modules."""

from .loader import (
    FinetuneData,
    PretrainData,
    build_finetune_data,
    build_loader,
    build_pretrain_data,
)

__all__ = [
    'FinetuneData',
    'PretrainData',
    'build_finetune_data',
    'build_loader',
    'build_pretrain_data',
]
