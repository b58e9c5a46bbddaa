"""`atomic_save`: write a file so that a crash at any moment leaves either the old file or the new.

Below checkpoint/layout.py so that any writer (checkpoints, safetensors exports, model_best.pth) can
use it without importing the checkpoint machinery.
"""
import errno
import os
import secrets

import torch

from utils.errors import CheckpointWriteError


def atomic_save(obj, path, write=None):
    """Write `obj` to `path` so that a crash at any moment leaves either the old file or the new.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and renamed over
    `path`; the folder is fsynced so the rename itself survives a power loss. The temporary name is
    unique per call (``{path}.{random}.tmp``), so two writers never share one. `write(obj, file)`
    produces the bytes: torch.save (looked up at call time) unless given.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f'{path}.{secrets.token_hex(6)}.tmp'
    try:
        with open(tmp, 'xb') as f:  # exclusive create; permissions follow the umask
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if os.path.exists(tmp) and not isinstance(e, FileExistsError):
            os.remove(tmp)
        reason = 'the disk is full' if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise CheckpointWriteError(
            f"Could not write checkpoint {path}: {reason}. Nothing was overwritten: earlier "
            f"checkpoints in {folder} are intact. Free space (or pass --output on a larger disk) "
            f"and resume from the newest checkpoint.") from e
