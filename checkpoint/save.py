"""Checkpoints in a run of one or many processes: which file a run continues from, and a save that
every rank takes part in (RNG states are gathered to rank 0, which writes) and agrees on (a failed
write raises on every rank, so none trains on alone). The file format is checkpoint/layout.py's."""
import torch

from checkpoint.layout import atomic_save, capture_rng_state
from utils.distributed import all_gather_objects, all_reduce_max, barrier
from checkpoint.sharded import (find_any_resume_checkpoint, save_sharded_checkpoint,
                                      verify_resume_checkpoint)


def choose_resume_checkpoint(config, logger):
    """(path, verified checkpoint dict) to continue from, or (None, None). Auto-resume from OUTPUT
    wins over MODEL.RESUME, as in the official code, so a requeued job picks up its newest file.
    Either layout: a single file or a sharded directory."""
    path, checkpoint = None, None
    if config.TRAIN.AUTO_RESUME:
        path, checkpoint = find_any_resume_checkpoint(config.OUTPUT, logger)
        if path and config.MODEL.RESUME and path != config.MODEL.RESUME:
            logger.warning(f'auto-resume: using {path} instead of MODEL.RESUME {config.MODEL.RESUME}')
    if path is None and config.MODEL.RESUME:
        path, checkpoint = config.MODEL.RESUME, verify_resume_checkpoint(config.MODEL.RESUME)
    return path, checkpoint


def save_on_main_rank(path, make_checkpoint, dist_info, device, logger):
    """Called on every rank: gather every rank's RNG states, let rank 0 write
    `make_checkpoint(rng_states)` to `path` atomically, and agree on the outcome. A failed write
    raises on every rank and leaves older files intact."""
    rng_states = all_gather_objects(capture_rng_state())
    failed = torch.zeros(1, device=device)
    error = None
    if dist_info.is_main:
        checkpoint = make_checkpoint(rng_states)
        try:
            atomic_save(checkpoint, path)
            logger.info(f'{path} saved')
        except Exception as e:  # noqa: BLE001 -- re-raised below after telling the other ranks
            error = e
            failed.fill_(1)
    all_reduce_max(failed)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f'Rank 0 failed to write {path}; see its log.')
    barrier()


def save_sharded_on_every_rank(path, model, optimizer, make_progress, dist_info, logger):
    """The sharded counterpart (TRAIN.SHARDING fsdp): every rank writes its shards of `model` and
    `optimizer` into the directory `path`, rank 0 the rest (`make_progress(rng_states)`); a failure
    on any rank raises on every rank (checkpoint.sharded.save_sharded_checkpoint)."""
    rng_states = all_gather_objects(capture_rng_state())
    save_sharded_checkpoint(path, model, optimizer, make_progress(rng_states), dist_info)
    logger.info(f'{path} saved')
