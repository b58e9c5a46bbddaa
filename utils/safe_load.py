"""Loading checkpoint files without executing code.

Every checkpoint is read with ``torch.load(weights_only=True)``. Official SimMIM checkpoints pickle
their yacs ``CfgNode`` config; the weights-only unpickler cannot rebuild that class, so it is read
as a plain ``OrderedDict`` through an explicit alias (the only non-tensor class we admit). Any other
pickled object makes the load fail with a message, and its code never runs.
"""
import collections
import os
import pickle

import torch

# Classes official checkpoints pickle, mapped to the harmless type that stands in for them.
_ALLOWED_ALIASES = [(collections.OrderedDict, 'yacs.config.CfgNode')]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


def load_checkpoint_file(path, purpose='checkpoint'):
    """Return the object stored in `path`, read on the CPU with weights_only=True.

    `purpose` names the flag or key the path came from, for the error message.
    """
    if not path:
        raise CheckpointError(f"No {purpose} path given.")
    if os.path.isdir(path):
        raise CheckpointError(f"{purpose}: {path} is a sharded checkpoint directory (TRAIN.SHARDING "
                              f"fsdp). Convert it to one file with `python tools/convert_checkpoint.py "
                              f"{path} OUT.pth` and pass OUT.pth (resuming a training run takes the directory itself).")
    if not os.path.isfile(path):
        raise CheckpointError(f"{purpose}: file not found: {path}. Check the path.")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{purpose}: {path} is empty (0 bytes), probably left by a write "
                              f"that was interrupted. Use an earlier checkpoint.")
    try:
        with torch.serialization.safe_globals(_ALLOWED_ALIASES):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if 'GLOBAL' in line]
        if not blocked:  # garbage the unpickler choked on, not a forbidden object
            raise _unreadable(path, purpose, e) from None
        first_line = blocked[0]
        raise CheckpointError(
            f"{purpose}: refused to load {path}: it contains a pickled object that is neither a "
            f"tensor, a container of tensors and numbers, nor an official SimMIM config, so "
            f"loading it could run arbitrary code. ({first_line}) Re-save the weights alone "
            f"(e.g. torch.save({{'model': state_dict}}, path)) from a trusted environment.") from None
    except Exception as e:  # truncated zip, plain text, old format with garbage, ...
        raise _unreadable(path, purpose, e) from None


def _unreadable(path, purpose, error):
    detail = str(error).splitlines()[0] if str(error) else ''
    return CheckpointError(
        f"{purpose}: {path} is not a readable PyTorch checkpoint (truncated or not a checkpoint "
        f"at all: {type(error).__name__}: {detail}). Use an earlier checkpoint or re-download "
        f"the file.")
