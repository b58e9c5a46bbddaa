"""Loading checkpoint files without executing code.

Every checkpoint is read with ``torch.load(weights_only=True)``. Official SimMIM checkpoints pickle
their yacs ``CfgNode`` config; the weights-only unpickler cannot rebuild that class, so it is read
as a plain ``OrderedDict`` through an explicit alias (the only non-tensor class we admit). Any other
pickled object makes the load fail with a message, and its code never runs. Safetensors files
(utils.safetensors_io) hold no pickle and are recognised by their content. A directory is refused
with what to pass instead (a sharded checkpoint is read by checkpoint.sharded).
"""

import collections
import logging
import os
import pickle

import torch

from utils.checksum import check_file, read_sidecar
from utils.errors import CheckpointError, ToolFailure
from utils.safetensors_io import is_safetensors_file, load_safetensors_checkpoint

# Classes official checkpoints pickle, mapped to the harmless type that stands in for them.
_ALLOWED_ALIASES = [(collections.OrderedDict, 'yacs.config.CfgNode')]
SHARDED_MARKER = 'COMPLETE'  # the last file a sharded checkpoint directory gets
SIDECAR = 'sidecar'  # load_checkpoint_file's default: the checksum record beside the file
logger = logging.getLogger('simmim.checkpoint')


def load_checkpoint_file(path, purpose='checkpoint', record=SIDECAR):
    """Return the object stored in `path`, read on the CPU with weights_only=True, after checking
    its bytes against their checksum record: the one beside the file by default (a file without
    one, e.g. an official checkpoint, loads with a log line saying it was not verified), a given
    record dict, or None when the caller has checked the file already.

    `purpose` names the flag or key the path came from, for the error message.
    """
    if not path:
        raise CheckpointError(f'No {purpose} path given.')
    if os.path.isdir(path):
        raise folder_error(path, purpose)
    if not os.path.isfile(path):
        raise CheckpointError(f'{purpose}: file not found: {path}. Check the path.')
    if os.path.getsize(path) == 0:
        raise CheckpointError(
            f'{purpose}: {path} is empty (0 bytes), probably left by a write '
            f'that was interrupted. Use an earlier checkpoint.'
        )
    checkpoint = _load(path, purpose)
    if record is SIDECAR:
        record = read_sidecar(path)
        if record is None:
            logger.info(
                f'{path}: no checksum recorded (an official or older checkpoint, or a '
                f'file written elsewhere), so its bytes are not verified'
            )
    if record is not None:
        check_file(path, record, purpose)
    return checkpoint


def check_reads_back(path, state_dict, what):
    """Raise ToolFailure unless the checkpoint file `path`, just written (e.g. the temporary file
    of utils.atomic_write.atomic_save), reads back with exactly the tensors of `state_dict` under
    'model'; `what` names the intended file in the message."""
    written = load_checkpoint_file(path, what, record=None).get('model', {})
    if written.keys() != state_dict.keys() or not all(
        torch.equal(written[k], state_dict[k].detach().cpu()) for k in state_dict
    ):
        raise ToolFailure(
            f'{what} does not read back with the tensors that were written; nothing was '
            f'replaced. Check the disk, then run the command again.'
        )


def _load(path, purpose):
    if path.endswith('.safetensors') or is_safetensors_file(path):
        try:
            return load_safetensors_checkpoint(path)
        except Exception as e:  # safetensors' own error for a damaged header or truncated data
            raise _unreadable(path, purpose, e) from None
    try:
        with torch.serialization.safe_globals(_ALLOWED_ALIASES):
            try:  # mapped, not copied: the checksum pass then reads the file only once
                return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError as e:
                if 'mmap' not in str(e):
                    raise
                return torch.load(path, map_location='cpu', weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if 'GLOBAL' in line]
        if not blocked:  # garbage the unpickler choked on, not a forbidden object
            raise _unreadable(path, purpose, e) from None
        first_line = blocked[0]
        raise CheckpointError(
            f'{purpose}: refused to load {path}: it contains a pickled object that is neither a '
            f'tensor, a container of tensors and numbers, nor an official SimMIM config, so '
            f'loading it could run arbitrary code. ({first_line}) Re-save the weights alone '
            f"(e.g. torch.save({{'model': state_dict}}, path)) from a trusted environment."
        ) from None
    except Exception as e:  # truncated zip, plain text, old format with garbage, ...
        raise _unreadable(path, purpose, e) from None


def folder_error(path, purpose):
    """The error for a folder given where a checkpoint file is expected: a sharded checkpoint
    (complete or not) or any other folder."""
    if os.path.isfile(os.path.join(path, SHARDED_MARKER)):
        return CheckpointError(
            f'{purpose}: {path} is a sharded checkpoint directory (TRAIN.SHARDING fsdp). Convert '
            f'it to one file with `python -m tools.convert_checkpoint {path} OUT.pth` and pass '
            'OUT.pth (resuming a training run takes the directory itself; python -m tools.export '
            'reads it too).'
        )
    if os.path.isfile(os.path.join(path, '.metadata')):  # DCP's index, written before the marker
        return CheckpointError(
            f'{purpose}: {path} is an incomplete sharded checkpoint: it has no {SHARDED_MARKER} '
            f'marker, so its write was interrupted. Use an earlier checkpoint.'
        )
    return CheckpointError(
        f'{purpose}: {path} is a folder, not a checkpoint file. Pass the file '
        f"itself, e.g. {os.path.join(path, 'ckpt_epoch_N.pth')} (a run's "
        f'folder is resumed by running its command again, with auto-resume).'
    )


def _unreadable(path, purpose, error):
    first_line = str(error).splitlines()[0] if str(error) else ''
    detail = first_line.split('. ')[0]
    if 'weights_only' in first_line:  # torch's advice to load unsafely; the bytes are no pickle
        detail = 'its bytes are not a pickled checkpoint'
    return CheckpointError(
        f'{purpose}: {path} is not a readable PyTorch checkpoint (truncated or not a checkpoint '
        f'at all: {type(error).__name__}: {detail}). Use an earlier checkpoint or re-download '
        f'the file.'
    )
