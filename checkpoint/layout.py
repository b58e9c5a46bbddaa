"""Checkpoints: atomic writes, exact-resume state, verified auto-resume.

Layout (official keys first): ``model``, ``optimizer``, ``lr_scheduler``, ``scaler`` (a fresh
GradScaler's state when the run has none, as the Swin-Transformer repo's loader needs), ``epoch``
(the last completed epoch), ``max_accuracy``, ``config`` (YAML text, not a pickled object), plus
``position`` ({'epoch', 'step'}: where training continues), ``rng_states`` (one entry per rank) and
``train_state`` (counters). Every file loads with ``torch.load(weights_only=True)``.

Epoch checkpoints are ``ckpt_epoch_{e}.pth``; step checkpoints (CHECKPOINT.STEP_FREQ) are
``ckpt_epoch_{e}_step_{k}.pth`` and hold the position inside epoch e, so a resume continues with
the very next batch. Under TRAIN.SHARDING fsdp the same content is a directory of that name
without ``.pth`` (checkpoint/sharded.py).
"""
import glob
import os
import random
import re
import shutil

import numpy as np
import torch

from utils.atomic_write import atomic_save  # noqa: F401  (re-exported)
from utils.errors import (CheckpointError, CheckpointWriteError,  # noqa: F401  (re-exported)
                          IncompatibleCheckpointError)
from checkpoint.optimizer_state import load_optimizer_state
from checkpoint.weights import load_full_state_dict
from utils.safe_load import load_checkpoint_file

FORMAT_VERSION = 1
REQUIRED_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch')
# Files ``ckpt_epoch_{e}[_step_{k}].pth``, or the sharded directories of those names without .pth.
_STEP_NAME = re.compile(r'ckpt_epoch_(\d+)_step_(\d+)(\.pth)?$')
_EPOCH_NAME = re.compile(r'ckpt_epoch_(\d+)(\.pth)?$')


def epoch_checkpoint_path(output_dir, epoch):
    return os.path.join(output_dir, f'ckpt_epoch_{epoch}.pth')


def step_checkpoint_path(output_dir, epoch, step):
    return os.path.join(output_dir, f'ckpt_epoch_{epoch}_step_{step}.pth')


def capture_rng_state():
    """This process's RNG states as plain Python values (bytes, ints, tuples), so they can be
    gathered across ranks with all_gather_object and stored in a weights_only-loadable file."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (np_state[0], np_state[1].tolist(), *(v.item() if hasattr(v, 'item') else v
                                                      for v in np_state[2:])),
        'torch': torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state['cuda'] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state):
    random.setstate(_as_tuples(state['python']))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_byte_tensor(state['torch']))
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])


def _byte_tensor(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_tuples(value):
    # random.setstate needs tuples where the saved state may come back as lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def build_checkpoint(config, model, optimizer, lr_scheduler, scaler, position, max_accuracy,
                     rng_states, train_state=None):
    """The dict written to disk. `position` = (epoch, step) where training continues."""
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            **progress_state(config, lr_scheduler, scaler, position, max_accuracy, rng_states,
                             train_state)}


def progress_state(config, lr_scheduler, scaler, position, max_accuracy, rng_states,
                   train_state=None):
    """Everything of a checkpoint but the model and optimizer tensors (both layouts)."""
    epoch, step = position
    return {
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': (scaler or _idle_grad_scaler()).state_dict(),
        'epoch': epoch - 1,  # the last completed epoch (official meaning)
        'max_accuracy': float(max_accuracy),
        'config': config.dump(),
        'position': {'epoch': int(epoch), 'step': int(step)},
        'rng_states': rng_states,
        'train_state': dict(train_state or {}),
        'format_version': FORMAT_VERSION,
    }


def _idle_grad_scaler():
    # bf16 and fp32 runs have no GradScaler; the Swin-Transformer repo's loader needs a valid
    # 'scaler' state to resume, so theirs is that of a fresh one (what an fp16 run starts with).
    return torch.amp.GradScaler('cpu')


def prune_step_checkpoints(output_dir, keep):
    """Delete all but the `keep` newest step checkpoints (epoch checkpoints are never touched)."""
    found = []
    for path in glob.glob(os.path.join(output_dir, 'ckpt_epoch_*_step_*')):
        match = _STEP_NAME.search(os.path.basename(path))
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), path))
    for _, path in sorted(found)[:-keep] if keep > 0 else []:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)  # sharded: a directory


def verify_checkpoint(path):
    """Load `path` and check it has the keys a resume needs; return the dict or raise."""
    checkpoint = load_checkpoint_file(path, 'resume checkpoint')
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (a weights-only file? use it with "
                              f"--pretrained, not --resume).")
    return checkpoint


def checkpoint_position(path):
    """The (epoch, step) where training continues from the checkpoint `path`, read from its name:
    ``ckpt_epoch_{e}.pth`` -> (e + 1, 0), ``ckpt_epoch_{e}_step_{k}.pth`` -> (e, k) (the same for
    sharded directories, named without ``.pth``); None for other names."""
    name = os.path.basename(os.path.normpath(path))
    match = _STEP_NAME.fullmatch(name)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = _EPOCH_NAME.fullmatch(name)
    return (int(match.group(1)) + 1, 0) if match else None


def _recorded_position(checkpoint):
    position = checkpoint.get('position')
    if isinstance(position, dict) and {'epoch', 'step'} <= position.keys():
        return int(position['epoch']), int(position['step'])
    return int(checkpoint['epoch']) + 1, 0  # official checkpoints: the last completed epoch


def _is_candidate(path):
    """A checkpoint file, or a sharded checkpoint directory (never a ``.tmp`` / ``.old`` one)."""
    return os.path.isfile(path) if path.endswith('.pth') else os.path.isdir(path)


def find_resume_checkpoint(output_dir, logger, verify=verify_checkpoint):
    """The checkpoint in `output_dir` that continues furthest, with its dict.

    Candidates are ``ckpt_epoch_*.pth`` files and sharded ``ckpt_epoch_*`` directories (so a
    weights-only ``model_best.pth`` is never taken), ordered by the position their names give,
    furthest first; modification times are ignored, since a copy, an rsync or a `touch` changes
    them. A candidate must pass `verify` (load, have the resume keys) and record the position its
    name gives; one that fails is skipped with a warning saying why. Returns (None, None) if none
    is usable.
    """
    candidates = [(checkpoint_position(p), p)
                  for p in glob.glob(os.path.join(output_dir, 'ckpt_epoch_*')) if _is_candidate(p)]
    for position, path in sorted((c for c in candidates if c[0] is not None), reverse=True):
        try:
            checkpoint = verify(path)
            recorded = _recorded_position(checkpoint)
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            logger.warning(f"auto-resume: skipping {path}: {e}")
            continue
        if recorded != position:
            logger.warning(f"auto-resume: skipping {path}: its name says epoch {position[0]}, step "
                           f"{position[1]} but it records epoch {recorded[0]}, step {recorded[1]} "
                           f"(renamed or copied over?).")
            continue
        return path, checkpoint
    return None, None


def load_training_state(checkpoint, model, optimizer, lr_scheduler, scaler, logger, rank=0,
                        world_size=1, config=None, path='', found_in=None):
    """Restore everything a resume needs from `checkpoint` (ours, or official: see
    checkpoint/optimizer_state.py; read from `path`; `found_in`: the folder auto-resume found it in,
    None for --resume); return (epoch, step, max_accuracy, train_state) where (epoch, step) is the
    position where training continues."""
    try:
        load_full_state_dict(model, checkpoint['model'], f'The resume checkpoint {path}'.rstrip())
    except IncompatibleCheckpointError as e:
        raise CheckpointError(f"{e} {resume_mismatch_fix(found_in)}") from None
    load_optimizer_state(optimizer, checkpoint, model, config, logger)
    return restore_progress(checkpoint, lr_scheduler, scaler, logger, rank, world_size)


def resume_mismatch_fix(found_in):
    """What to do about a resume checkpoint of another model (`found_in`: the folder auto-resume
    found it in, None for --resume)."""
    if found_in:
        return (f"Auto-resume found it in {found_in}, so that folder holds a run of another "
                f"model. Give this run its own folder with --tag NAME or --output DIR.")
    return "Pass a checkpoint of this config's model, or set MODEL.* to match the checkpoint."


def restore_progress(checkpoint, lr_scheduler, scaler, logger, rank=0, world_size=1):
    """Restore what `progress_state` saved; return (epoch, step, max_accuracy, train_state)."""
    changes = lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    if changes:
        logger.warning('The LR schedule of this config differs from the checkpoint\'s; the config '
                       'wins: ' + '; '.join(changes))
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    rng_states = checkpoint.get('rng_states')
    if rng_states and len(rng_states) == world_size:
        restore_rng_state(rng_states[rank])
    elif rng_states:
        logger.warning(f"The checkpoint was written by {len(rng_states)} processes and this run has "
                       f"{world_size}: RNG states are not restored, so the continuation is not "
                       f"bit-identical (it is still correct).")
    epoch, step = _recorded_position(checkpoint)
    return epoch, step, checkpoint.get('max_accuracy', 0.0), checkpoint.get('train_state', {})

