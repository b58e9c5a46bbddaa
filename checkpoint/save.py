"""Saving the training state in a run of one or many processes, in either layout.

A single file: every rank's RNG states are gathered, rank 0 writes the file atomically, and every
rank agrees on the outcome (a failed write raises on every rank, so none trains on alone). A
sharded directory (TRAIN.SHARDING fsdp): every rank writes its shards, rank 0 the rest
(checkpoint/sharded.py). Earlier checkpoints are never touched by a failed write.
"""

import logging

from yacs.config import CfgNode

from checkpoint.layout import (
    TrainingState,
    build_checkpoint,
    capture_rng_state,
    progress_state,
    sharded_path,
)
from checkpoint.sharded import save_sharded_checkpoint
from utils.atomic_write import atomic_save
from utils.distributed import DistInfo, all_gather_objects, barrier, on_main_rank


def save_training_state(
    path: str,
    state: TrainingState,
    position: tuple[int, int],
    config: CfgNode,
    dist_info: DistInfo,
    logger: logging.Logger,
) -> str:
    """Called on every rank: write `state` (a TrainingState) for continuing at `position` (epoch,
    step) to `path`, a single file, or under TRAIN.SHARDING fsdp the directory of that name
    without ``.pth``; return the path written."""
    rng_states = all_gather_objects(capture_rng_state())
    if config.TRAIN.SHARDING == 'fsdp':
        path = sharded_path(path)
        save_sharded_checkpoint(
            path,
            state.model,
            state.optimizer,
            progress_state(config, state, position, rng_states),
            dist_info,
        )
    else:
        on_main_rank(
            lambda: atomic_save(
                build_checkpoint(config, state, position, rng_states), path, checksum=True
            ),
            dist_info.is_main,
        )
        barrier()
    logger.info(f'{path} saved')
    return path
