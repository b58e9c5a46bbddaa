"""Checkpoints: atomic writes, exact-resume state, verified auto-resume.

Layout (official keys first): ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch``
(the last completed epoch), ``max_accuracy``, ``config`` (YAML text, not a pickled object), plus
``position`` ({'epoch', 'step'}: where training continues), ``rng_states`` (one entry per rank) and
``train_state`` (counters). Every file loads with ``torch.load(weights_only=True)``.

Epoch checkpoints are ``ckpt_epoch_{e}.pth``; step checkpoints (CHECKPOINT.STEP_FREQ) are
``ckpt_epoch_{e}_step_{k}.pth`` and hold the position inside epoch e, so a resume continues with
the very next batch. Under TRAIN.SHARDING fsdp the same content is a directory of that name
without ``.pth`` (utils/sharded_checkpoint.py).
"""
import errno
import glob
import os
import random
import re
import shutil

import numpy as np
import torch

from utils.safe_load import CheckpointError, load_checkpoint_file

FORMAT_VERSION = 1
REQUIRED_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch')
_STEP_NAME = re.compile(r'ckpt_epoch_(\d+)_step_(\d+)(\.pth)?$')  # file, or sharded directory


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


def epoch_checkpoint_path(output_dir, epoch):
    return os.path.join(output_dir, f'ckpt_epoch_{epoch}.pth')


def step_checkpoint_path(output_dir, epoch, step):
    return os.path.join(output_dir, f'ckpt_epoch_{epoch}_step_{step}.pth')


def atomic_save(obj, path):
    """Write `obj` to `path` so that a crash at any moment leaves either the old file or the new.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and renamed over
    `path`; the folder is fsynced so the rename itself survives a power loss.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = 'the disk is full' if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise CheckpointWriteError(
            f"Could not write checkpoint {path}: {reason}. Nothing was overwritten: earlier "
            f"checkpoints in {folder} are intact. Free space (or pass --output on a larger disk) "
            f"and resume from the newest checkpoint.") from e


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
        'scaler': scaler.state_dict() if scaler is not None else None,
        'epoch': epoch - 1,  # the last completed epoch (official meaning)
        'max_accuracy': float(max_accuracy),
        'config': config.dump(),
        'position': {'epoch': int(epoch), 'step': int(step)},
        'rng_states': rng_states,
        'train_state': dict(train_state or {}),
        'format_version': FORMAT_VERSION,
    }


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


def find_resume_checkpoint(output_dir, logger, candidates=None, verify=verify_checkpoint):
    """The newest checkpoint in `output_dir` that loads and has the resume keys, with its dict.

    Candidates are ``ckpt_epoch_*.pth`` files (so a weights-only ``model_best.pth`` is never taken),
    newest modification time first as in the official auto-resume; a file that fails verification
    is skipped with a warning saying why. Returns (None, None) if none is usable. `candidates`
    (paths, newest first) and `verify` let the sharded layout (utils/sharded_checkpoint.py) reuse
    this.
    """
    if candidates is None:
        candidates = sorted(glob.glob(os.path.join(output_dir, 'ckpt_epoch_*.pth')),
                            key=os.path.getmtime, reverse=True)
    for path in candidates:
        try:
            return path, verify(path)
        except CheckpointError as e:
            logger.warning(f"auto-resume: skipping {path}: {e}")
    return None, None


def load_training_state(checkpoint, model, optimizer, lr_scheduler, scaler, logger, rank=0,
                        world_size=1):
    """Restore everything a resume needs from `checkpoint`; return (epoch, step, max_accuracy,
    train_state) where (epoch, step) is the position where training continues."""
    mismatches = checkpoint_shape_mismatches(model, checkpoint['model'])
    if mismatches:
        raise CheckpointError(
            "The resume checkpoint does not fit the model (another architecture or size?); first "
            "mismatches (key, checkpoint shape, model shape): " + '; '.join(map(str, mismatches)))
    incompatible = model.load_state_dict(checkpoint['model'], strict=False)
    # Index and mask buffers are not saved and are rebuilt by the models, so nothing may be missing.
    missing = incompatible.missing_keys
    if missing or incompatible.unexpected_keys:
        raise CheckpointError(
            f"The resume checkpoint does not match the model (another architecture or size?): "
            f"missing {missing[:5]}, unexpected {incompatible.unexpected_keys[:5]}.")
    optimizer.load_state_dict(checkpoint['optimizer'])
    return restore_progress(checkpoint, lr_scheduler, scaler, logger, rank, world_size)


def restore_progress(checkpoint, lr_scheduler, scaler, logger, rank=0, world_size=1):
    """Restore what `progress_state` saved; return (epoch, step, max_accuracy, train_state)."""
    changes = lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    if changes:
        logger.warning('The LR schedule of this config differs from the checkpoint\'s; the config '
                       'wins: ' + '; '.join(changes))
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    position = checkpoint.get('position') or {'epoch': checkpoint['epoch'] + 1, 'step': 0}
    rng_states = checkpoint.get('rng_states')
    if rng_states and len(rng_states) == world_size:
        restore_rng_state(rng_states[rank])
    elif rng_states:
        logger.warning(f"The checkpoint was written by {len(rng_states)} processes and this run has "
                       f"{world_size}: RNG states are not restored, so the continuation is not "
                       f"bit-identical (it is still correct).")
    return (position['epoch'], position['step'], checkpoint.get('max_accuracy', 0.0),
            checkpoint.get('train_state', {}))


def checkpoint_shape_mismatches(model, state_dict, limit=5):
    """The first `limit` (key, checkpoint shape, model shape) that differ, for error messages."""
    own = model.state_dict()
    out = []
    for key, value in state_dict.items():
        if key in own and hasattr(value, 'shape') and tuple(value.shape) != tuple(own[key].shape):
            out.append((key, tuple(value.shape), tuple(own[key].shape)))
            if len(out) == limit:
                break
    return out
