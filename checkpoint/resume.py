"""Resuming, for both layouts (a single file or a sharded directory) and any world size.

    choose_resume_checkpoint(config, logger) -> (path, checkpoint) or (None, None)
    find_resume_checkpoint(output_dir, logger)   the furthest intact checkpoint of a run folder
    verify_resume_checkpoint(path)               either layout, checked for a resume
    resume_training(path, checkpoint, state, config, logger, dist_info) -> (epoch, step)

`state` is a checkpoint.layout.TrainingState: model, optimizer, schedule and scaler are loaded in
place, and its counters restored. How auto-resume picks a checkpoint: docs/resume.md.
"""

import glob
import logging
import os

from yacs.config import CfgNode

from checkpoint.layout import (
    TrainingState,
    checkpoint_position,
    is_candidate,
    recorded_position,
    restore_rng_state,
    verify_checkpoint,
)
from checkpoint.optimizer_state import load_optimizer_state
from checkpoint.sharded import (
    is_sharded_checkpoint,
    load_distributed_state,
    verify_sharded_checkpoint,
)
from checkpoint.stored_config import require_same_data
from checkpoint.weights import load_full_state_dict
from utils.distributed import is_fsdp, on_main_rank
from utils.errors import CheckpointError, IncompatibleCheckpointError


def verify_resume_checkpoint(path, check_bytes=True):
    """Either layout: a directory is sharded, a file single (see their verify functions)."""
    if is_sharded_checkpoint(path):
        return verify_sharded_checkpoint(path, check_bytes)
    return verify_checkpoint(path, check_bytes)


def find_resume_checkpoint(output_dir, logger):
    """The checkpoint in `output_dir` that continues furthest, with its dict.

    Candidates are ``ckpt_epoch_*.pth`` files and sharded ``ckpt_epoch_*`` directories (so a
    weights-only ``model_best.pth`` is never taken), ordered by the position their names give,
    furthest first; modification times are ignored, since a copy, an rsync or a `touch` changes
    them. A candidate must verify (load, have the resume keys) and record the position its name
    gives; one that fails is skipped with a warning saying why. Returns (None, None) if none is
    usable.
    """
    candidates = [
        (checkpoint_position(p), p)
        for p in glob.glob(os.path.join(output_dir, 'ckpt_epoch_*'))
        if is_candidate(p)
    ]
    for position, path in sorted((c for c in candidates if c[0] is not None), reverse=True):
        try:
            checkpoint = verify_resume_checkpoint(path)
            recorded = recorded_position(checkpoint)
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            logger.warning(f'auto-resume: skipping {path}: {e}')
            continue
        if recorded != position:
            logger.warning(
                f'auto-resume: skipping {path}: its name says epoch {position[0]}, step '
                f'{position[1]} but it records epoch {recorded[0]}, step {recorded[1]} '
                f'(renamed or copied over?).'
            )
            continue
        return path, checkpoint
    return None, None


def choose_resume_checkpoint(config, logger, is_main=True):
    """(path, verified checkpoint dict) to continue from, or (None, None). Auto-resume from OUTPUT
    wins over MODEL.RESUME, as in the official code, so a requeued job picks up its newest file.
    Collective: rank 0 (`is_main`) chooses and checks every byte, the other ranks read what it
    chose without checking the bytes again."""
    chosen = {}

    def choose():
        chosen['path'], chosen['checkpoint'] = _choose(config, logger)
        return chosen['path']

    path = on_main_rank(choose, is_main)
    if path is None:
        return None, None
    return path, chosen['checkpoint'] if is_main else verify_resume_checkpoint(path, False)


def _choose(config, logger):
    path, checkpoint = None, None
    if config.TRAIN.AUTO_RESUME:
        path, checkpoint = find_resume_checkpoint(config.OUTPUT, logger)
        if path:
            require_same_data(config, path, checkpoint)
        if path and config.MODEL.RESUME and path != config.MODEL.RESUME:
            logger.warning(
                f'auto-resume: using {path} instead of MODEL.RESUME {config.MODEL.RESUME}'
            )
    if path is None and config.MODEL.RESUME:
        path, checkpoint = config.MODEL.RESUME, verify_resume_checkpoint(config.MODEL.RESUME)
    return path, checkpoint


def resume_mismatch_fix(found_in):
    """What to do about a resume checkpoint of another model (`found_in`: the folder auto-resume
    found it in, None for --resume)."""
    if found_in:
        return (
            f'Auto-resume found it in {found_in}, so that folder holds a run of another '
            f'model. Give this run its own folder with --tag NAME or --output DIR.'
        )
    return "Pass a checkpoint of this config's model, or set MODEL.* to match the checkpoint."


def resume_training(
    path: str,
    checkpoint: dict,
    state: TrainingState,
    config: CfgNode,
    logger: logging.Logger,
    rank: int = 0,
    world_size: int = 1,
    found_in: str | None = None,
) -> tuple[int, int]:
    """Restore `state` (a TrainingState) from `checkpoint`, what verifying `path` returned (ours or
    official; either layout); return the (epoch, step) where training continues. A sharded
    directory, or a model sharded by FSDP, loads through DCP (any world size); a single file into
    a whole model loads directly. `found_in`: the folder auto-resume found it in (None for
    --resume), for the message of a checkpoint of another model."""
    try:
        if is_sharded_checkpoint(path) or is_fsdp(state.model):
            load_distributed_state(path, checkpoint, state, config, logger)
        else:
            load_full_state_dict(state.model, checkpoint['model'], f'The resume checkpoint {path}')
            load_optimizer_state(state.optimizer, checkpoint, state.model, config, logger)
    except IncompatibleCheckpointError as e:
        raise CheckpointError(f'{e} {resume_mismatch_fix(found_in)}') from None
    return restore_progress(checkpoint, state, logger, rank, world_size)


def restore_progress(checkpoint, state, logger, rank=0, world_size=1):
    """Restore what `progress_state` saved into `state`; return the (epoch, step) where training
    continues."""
    changes = state.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    if changes:
        logger.warning(
            "The LR schedule of this config differs from the checkpoint's; the config "
            'wins: ' + '; '.join(changes)
        )
    if state.scaler is not None and checkpoint.get('scaler'):
        state.scaler.load_state_dict(checkpoint['scaler'])
    rng_states = checkpoint.get('rng_states')
    if rng_states and len(rng_states) == world_size:
        restore_rng_state(rng_states[rank])
    elif rng_states:
        logger.warning(
            f'The checkpoint was written by {len(rng_states)} processes and this run has '
            f'{world_size}: RNG states are not restored, so the continuation is not '
            f'bit-identical (it is still correct).'
        )
    state.load_counters(checkpoint.get('train_state', {}), checkpoint.get('max_accuracy', 0.0))
    return recorded_position(checkpoint)
