"""The single-file checkpoint: its names, its keys, and the training state it saves and restores.

    TrainingState                       model, optimizer, schedule, scaler and the run's counters
    build_checkpoint / progress_state   the dict written to disk (without the tensors: the latter)
    epoch_checkpoint_path, step_checkpoint_path, checkpoint_position, sharded_path   names
    verify_checkpoint(path)             load a file and check it can be resumed from
    prune_step_checkpoints(folder, keep)

Keys (official ones first): ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch`` (the
last completed epoch), ``max_accuracy``, ``config`` (YAML text), then ``position``, ``rng_states``,
``train_state`` and ``format_version``. The layout and why it is so: docs/resume.md.
"""

import glob
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from data.shards import check_fingerprint
from utils.checksum import sidecar_path
from utils.errors import CheckpointError
from utils.safe_load import SIDECAR, load_checkpoint_file
from utils.state_dict import check_finite

FORMAT_VERSION = 1
BEST_CHECKPOINT = 'model_best.pth'  # fine-tuning's best validation accuracy: weights and scalars
REQUIRED_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch')
# Files ``ckpt_epoch_{e}[_step_{k}].pth``, or the sharded directories of those names without .pth.
_STEP_NAME = re.compile(r'ckpt_epoch_(\d+)_step_(\d+)(\.pth)?$')
_EPOCH_NAME = re.compile(r'ckpt_epoch_(\d+)(\.pth)?$')


@dataclass
class TrainingState:
    """Everything a checkpoint saves and a resume restores. `model` is the model itself (sharded in
    place under FSDP, never the DDP wrapper); the counters are the run's, kept across resumes."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: torch.amp.GradScaler | None = None
    max_accuracy: float = 0.0
    global_update: int = 0  # optimizer steps taken (skipped non-finite steps included)
    skipped_total: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    # What the training data is (data.shards.ShardDataset.fingerprint; None for other sources):
    # recorded with the counters, and a resume on another shard set is refused.
    data_fingerprint: dict | None = None

    def counters(self):
        counters = {'global_update': self.global_update, 'skipped_total': self.skipped_total}
        return {**counters, 'data': self.data_fingerprint} if self.data_fingerprint else counters

    def load_counters(self, counters, max_accuracy):
        check_fingerprint(counters.get('data'), self.data_fingerprint)
        self.global_update = int(counters.get('global_update', 0))
        self.skipped_total = int(counters.get('skipped_total', 0))
        self.max_accuracy = float(max_accuracy)


# -----------------------------------------------------------------------------------------------
# Names
# -----------------------------------------------------------------------------------------------
def epoch_checkpoint_path(output_dir, epoch):
    return os.path.join(output_dir, f'ckpt_epoch_{epoch}.pth')


def step_checkpoint_path(output_dir, epoch, step):
    return os.path.join(output_dir, f'ckpt_epoch_{epoch}_step_{step}.pth')


def sharded_path(path):
    """The directory name of a sharded checkpoint for a single-file path (drops ``.pth``)."""
    return path[: -len('.pth')] if path.endswith('.pth') else path


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


def is_candidate(path):
    """A checkpoint file, or a sharded checkpoint directory (never a ``.tmp`` / ``.old`` one)."""
    return os.path.isfile(path) if path.endswith('.pth') else os.path.isdir(path)


def prune_step_checkpoints(output_dir, keep):
    """Delete all but the `keep` newest step checkpoints (epoch checkpoints are never touched)."""
    found = []
    for path in glob.glob(os.path.join(output_dir, 'ckpt_epoch_*_step_*')):
        match = _STEP_NAME.fullmatch(os.path.basename(path))
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), path))
    for _, path in sorted(found)[:-keep] if keep > 0 else []:
        remove_checkpoint(path)


def remove_checkpoint(path):
    """Delete a checkpoint: a sharded directory, or a single file with its checksum record."""
    if os.path.isdir(path):
        shutil.rmtree(path)
        return
    os.remove(path)
    if os.path.exists(sidecar_path(path)):
        os.remove(sidecar_path(path))


# -----------------------------------------------------------------------------------------------
# RNG states
# -----------------------------------------------------------------------------------------------
def capture_rng_state():
    """This process's RNG states as plain Python values (bytes, ints, tuples), so they can be
    gathered across ranks with all_gather_object and stored in a weights_only-loadable file."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (
            np_state[0],
            np_state[1].tolist(),
            *(v.item() if hasattr(v, 'item') else v for v in np_state[2:]),
        ),
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


# -----------------------------------------------------------------------------------------------
# Contents
# -----------------------------------------------------------------------------------------------
def build_checkpoint(config, state, position, rng_states):
    """The dict written to disk for `state` (a TrainingState); `position` = (epoch, step) where
    training continues."""
    return {
        'model': state.model.state_dict(),
        'optimizer': state.optimizer.state_dict(),
        **progress_state(config, state, position, rng_states),
    }


def progress_state(config, state, position, rng_states):
    """Everything of a checkpoint but the model and optimizer tensors (both layouts). `position`
    is (epoch, step) or (epoch, step, samples): where training continues, with the number of the
    epoch's samples already trained over all ranks (what a resume on another world size needs)."""
    epoch, step, *samples = position
    return {
        'lr_scheduler': state.lr_scheduler.state_dict(),
        'scaler': (state.scaler or _idle_grad_scaler()).state_dict(),
        'epoch': epoch - 1,  # the last completed epoch (official meaning)
        'max_accuracy': float(state.max_accuracy),
        'config': config.dump(),
        'position': {
            'epoch': int(epoch),
            'step': int(step),
            **({'samples': int(samples[0])} if samples else {}),
        },
        'rng_states': rng_states,
        'train_state': state.counters(),
        'format_version': FORMAT_VERSION,
    }


def _idle_grad_scaler():
    # bf16 and fp32 runs have no GradScaler; the Swin-Transformer repo's loader needs a valid
    # 'scaler' state to resume, so theirs is that of a fresh one (what an fp16 run starts with).
    return torch.amp.GradScaler('cpu')


def recorded_position(checkpoint):
    """The (epoch, step) where training continues, as `checkpoint` records it."""
    position = checkpoint.get('position')
    if isinstance(position, dict) and {'epoch', 'step'} <= position.keys():
        return int(position['epoch']), int(position['step'])
    return int(checkpoint['epoch']) + 1, 0  # official checkpoints: the last completed epoch


def recorded_samples(checkpoint):
    """The epoch's samples already trained over all ranks, as `checkpoint` records it (None for
    checkpoints that do not: official ones, older ones of ours)."""
    position = checkpoint.get('position')
    return (
        int(position['samples']) if isinstance(position, dict) and 'samples' in position else None
    )


def verify_checkpoint(path, check_bytes=True):
    """Load `path` (with `check_bytes`: against its checksum record) and check it has the keys a
    resume needs and finite weights and optimizer state; return the dict or raise."""
    checkpoint = load_checkpoint_file(path, 'resume checkpoint', SIDECAR if check_bytes else None)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.')
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(
            f'{path} lacks {", ".join(missing)} (a weights-only file? use it with '
            f'--pretrained, not --resume).'
        )
    check_finite(
        {'model': checkpoint['model'], 'optimizer': checkpoint['optimizer']},
        f'The checkpoint {path}',
    )
    return checkpoint
