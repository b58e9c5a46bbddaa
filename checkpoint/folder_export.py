"""Writing a model folder (timm's or transformers') so that a failed export replaces nothing.

export_folder(out_dir, kind, write, verify=None)
    write(staging) fills a staging folder beside `out_dir`; verify(staging) checks the files
    there; only then are they published: a new `out_dir` is the staging folder renamed, an
    earlier export gets each file by an atomic rename. Whatever write or verify raises leaves
    `out_dir` as it was.
"""

import errno
import os
import shutil
import tempfile

from utils.atomic_write import fsync_folder, usual_mode
from utils.errors import CheckpointWriteError, ConfigError


def export_folder(out_dir, kind, write, verify=None):
    """Stage, check and publish the folder export `out_dir` (`kind`, e.g. 'timm', names it in
    messages); returns what `write` returned."""
    target = os.path.normpath(os.path.abspath(out_dir))
    parent = os.path.dirname(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(
            f'{out_dir} is a file, but a {kind} export is a folder (config.json and '
            f'model.safetensors). Pass a new folder or an earlier export.'
        )
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.export-', dir=parent)
    except OSError as e:
        raise ConfigError(
            f'Cannot write to {out_dir}: {e.strerror or e}. Pick a folder you can write to.'
        ) from None
    try:
        try:
            result = write(staging)
            _settle_files(staging)
        except OSError as e:
            raise CheckpointWriteError(
                f'Could not write the {kind} export {out_dir}: '
                f'{"the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e}. '
                f'Nothing was replaced: an earlier export there is intact.'
            ) from None
        if verify is not None:
            verify(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it became `target`
    return result


def _settle_files(folder):
    for name in os.listdir(folder):
        file = os.path.join(folder, name)
        os.chmod(file, usual_mode())  # safetensors writes through a private (0600) file
        with open(file, 'rb') as f:
            os.fsync(f.fileno())


def _publish(staging, target):
    """Move the verified files of `staging` to `target`: the whole folder in one rename when
    `target` is new, else file by file (each rename atomic), so no reader sees a half-written
    file."""
    if os.path.isdir(target):
        for name in sorted(os.listdir(staging), key=lambda n: n == 'config.json'):
            os.replace(os.path.join(staging, name), os.path.join(target, name))
        fsync_folder(target)
    else:
        os.chmod(staging, usual_mode(folder=True))  # mkdtemp's folder is private (0700)
        os.rename(staging, target)
    fsync_folder(os.path.dirname(target))
