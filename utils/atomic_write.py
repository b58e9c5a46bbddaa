"""Writing files so that a crash at any moment leaves either the old file or the new, and the one
message a failed checkpoint write gets.

    atomic_save(obj, path, write=None, checksum=False, verify=None)   temporary file, fsync,
                                         verify, rename, fsync of the folder; a checksum record
    atomic_write(path, write, checksum=False, verify=None)   the same for any file: `write(f)`
                                         fills it, and an OSError is raised as it is
    usual_mode(folder=False)             the permissions a new file (folder) gets under the umask
    fsync_folder(path)                   make a rename inside `path` survive a power loss
    write_error(path, errors, ...)       the CheckpointWriteError for a write that failed
"""

import errno
import os
import secrets

import torch

from utils.checksum import HashingWriter, sidecar_path, write_sidecar
from utils.errors import CheckpointWriteError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_folder(path):
    """fsync the folder `path`, so the renames done in it are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path, errors, what='checkpoint', where='a larger disk'):
    """The CheckpointWriteError for `path` that could not be written: the disk is full when any of
    `errors` (the exception and, e.g., each rank's cause) says so, else the first one's reason."""
    errors = [e for e in errors if e is not None]
    if any(getattr(e, 'errno', None) in _DISK_FULL for e in errors):
        reason = 'the disk is full'
    else:
        first = errors[0]
        reason = getattr(first, 'strerror', None) or f'{type(first).__name__}: {str(first)[:300]}'
    folder = os.path.dirname(os.path.abspath(path))
    return CheckpointWriteError(
        f'Could not write {what} {path}: {reason}. Nothing was overwritten: earlier checkpoints '
        f'in {folder} are intact. Free space (or pass --output on {where}) and resume from the '
        f'newest checkpoint.'
    )


def usual_mode(folder=False):
    """The permission bits open() (os.makedirs) gives a new file (folder) under the current umask:
    what a file written through a private temporary name (mkstemp, mkdtemp: 0600 / 0700) is
    given back before it is published."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_save(obj, path, write=None, checksum=False, verify=None):
    """Write `obj` to `path` so that a crash at any moment leaves either the old file or the new.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and renamed over
    `path`; the folder is fsynced so the rename itself survives a power loss. The temporary name is
    unique per call (``{path}.{random}.tmp``), so two writers never share one. `write(obj, file)`
    produces the bytes: torch.save (looked up at call time) unless given. With `checksum`, the
    bytes are hashed as they are written and the record goes beside the file
    (utils/checksum.py); an earlier record is removed before the rename, so a crash never pairs
    the new file with the old record. `verify(tmp)`, when given, checks the written temporary file
    before it replaces `path`; whatever it raises leaves `path` (and its record) untouched. A
    failed write raises the CheckpointWriteError of write_error.
    """
    try:
        atomic_write(path, lambda f: (write or torch.save)(obj, f), checksum, verify)
    except OSError as e:
        raise write_error(path, [e]) from e


def atomic_write(path, write, checksum=False, verify=None):
    """atomic_save for files that are not checkpoints (shards, indexes, JSON and text records):
    `write(file)` fills the temporary file (opened in binary mode), and an OSError is raised as it
    is, for the caller to report in its own words. The temporary file is removed on any failure
    but a clash of temporary names (FileExistsError: another writer's file)."""
    tmp = f'{path}.{secrets.token_hex(6)}.tmp'
    try:
        with open(tmp, 'xb') as f:  # exclusive create; permissions follow the umask
            target = HashingWriter(f) if checksum else f
            write(target)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        if checksum and os.path.exists(sidecar_path(path)):
            os.remove(sidecar_path(path))
        os.replace(tmp, path)
        if checksum:
            write_sidecar(path, target.record())
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    except FileExistsError:
        raise
    except BaseException:  # a full disk, a failed verification, an interrupt: the file goes
        _remove(tmp)
        raise
