"""What a run keeps in its output folder besides checkpoints and logs: the lock that makes it the
folder's only writer, and the record of its config.

Lock. Rank 0 holds ``OUTPUT/run.lock`` for the whole run: an exclusive POSIX record lock
(``lockf``) on the file, which the kernel releases when the process ends in any way (a crash or
SIGKILL included), and in the file the holder's host, pid, start time and command, for the message
a second run gets. A record lock belongs to the process alone: the DataLoader workers forked from
it do not share it (they would share a ``flock``, and keep the folder locked after a SIGKILL of the
main process until they notice and exit), so a restart right after a kill takes the folder at
once. On a file system without working locks the file's content decides instead: a lock
naming a process that no longer exists on this host is stale and taken over; one naming a live
process, or another host (whose processes cannot be checked from here), stops the second run. A
clean exit removes the file; one left behind by a killed run is taken over with a log line.

Config. ``config.yaml`` is written once the run is known to start (data, model and any resume
checkpoint loaded). When a later start of the same folder uses a different config, the previous
file is kept as ``config.{its start time}.yaml``, so the record of what produced the existing
checkpoints is never lost.
"""

import datetime
import errno
import json
import os
import socket
import sys
import time

import yaml

from utils.atomic_write import atomic_save
from utils.distributed import on_main_rank
from utils.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: only the content of the lock file is checked
    fcntl = None

LOCK_NAME = 'run.lock'
CONFIG_NAME = 'config.yaml'

_held = {}  # lock path -> open file descriptor, in this process


class OutputFolderBusy(ConfigError):
    """Another run writes to this output folder; the message names it and the fix."""


def _describe_this_process():
    return {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'started': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    }


def _read_holder(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode('utf-8', 'replace').strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {'content': text}
    except ValueError:
        return {'content': text}


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or unreadable: assume it lives
    return True


def _busy_error(folder, path, holder):
    holder = holder or {}
    command = f' ({holder["command"]})' if holder.get('command') else ''
    who = (
        f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")}, started '
        f'{holder.get("started", "?")}{command}'
    )
    return OutputFolderBusy(
        f'The output folder {folder} is in use by another run: {who}. Two runs in one folder '
        f"overwrite each other's checkpoints, config and log. Give this run its own folder with "
        f'--tag NAME (or --output DIR), or stop the other run first. If that run no longer exists '
        f'(e.g. its machine crashed), delete {path} and start again.'
    )


def take_output_folder(folder, dist_info):
    """Rank 0 takes `folder` (see acquire_output_folder); every rank raises the same
    OutputFolderBusy if it could not. Returns the takeover log line or None."""
    return on_main_rank(lambda: acquire_output_folder(folder), dist_info.is_main)


def acquire_output_folder(folder):
    """Take `folder` for this process or raise OutputFolderBusy. Returns a log line to show (or
    None) when a lock left by a run that was killed was taken over."""
    path = os.path.join(folder, LOCK_NAME)
    if path in _held:
        return None
    for _ in range(5):  # the file may be replaced between open and lock by a run that just ended
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous, locked = _lock(fd, folder, path)
            if locked and not _same_file(fd, path):
                os.close(fd)
                continue
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_describe_this_process()) + '\n').encode())
        os.fsync(fd)
        _held[path] = fd
        if previous:
            return (
                f'Took over {path}, left by a run that did not exit cleanly (pid '
                f'{previous.get("pid", "?")} on host {previous.get("host", "?")}, started '
                f'{previous.get("started", "?")}); it is no longer running.'
            )
        return None
    raise _busy_error(folder, path, None)


def _lock(fd, folder, path):
    """(content of a lock left behind, whether the kernel lock is held); or OutputFolderBusy."""
    if fcntl is not None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return _read_holder(fd), True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):  # POSIX allows either for "held"
                raise _busy_error(folder, path, _read_holder(fd)) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    holder = _read_holder(fd)  # no working lock here: judge by the content
    if (
        holder
        and holder.get('pid') != os.getpid()
        and (holder.get('host') != socket.gethostname() or _pid_alive(holder.get('pid')))
    ):
        raise _busy_error(folder, path, holder)
    return holder, False


def _same_file(fd, path):
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def release_output_folders():
    """Remove and unlock every lock this process holds (a clean end of the run)."""
    for path, fd in list(_held.items()):
        try:
            os.remove(path)  # before unlocking, so no one can lock the old file after us
        except OSError:
            pass
        os.close(fd)
        del _held[path]


def record_config(config, logger):
    """Write OUTPUT/config.yaml for a run that has started; keep a different previous one."""
    path = os.path.join(config.OUTPUT, CONFIG_NAME)
    text = config.dump()
    if os.path.isfile(path):
        with open(path) as f:
            previous = f.read()
        if previous == text:
            logger.info(f'Config unchanged: {path}')
            return path
        stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(os.path.getmtime(path)))
        kept = os.path.join(config.OUTPUT, f'config.{stamp}.yaml')
        os.replace(path, kept)
        logger.warning(
            f'This start of {config.OUTPUT} uses another config than the previous one; '
            f'the previous config is kept as {kept}. Changed: '
            f'{", ".join(changed_keys(previous, text)) or "(formatting only)"}'
        )
    atomic_save(text, path, write=lambda text, f: f.write(text.encode()))
    logger.info(f'Full config saved to {path}')
    return path


def changed_keys(old_yaml, new_yaml, limit=10):
    """'KEY old -> new' for the first `limit` leaf keys that differ between two config dumps."""

    def flatten(node, prefix=''):
        if not isinstance(node, dict):
            return {prefix[:-1]: node}
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f'{prefix}{key}.'))
        return out

    old, new = flatten(yaml.safe_load(old_yaml) or {}), flatten(yaml.safe_load(new_yaml) or {})
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return [f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in keys[:limit]]


def finished_message(config, checkpoint_path):
    """What to say when a run starts at or after its last epoch."""
    where = (
        f'{checkpoint_path} holds all {config.TRAIN.EPOCHS} epochs (TRAIN.EPOCHS)'
        if checkpoint_path
        else f'TRAIN.START_EPOCH {config.TRAIN.START_EPOCH} is not below '
        f'TRAIN.EPOCHS {config.TRAIN.EPOCHS}'
    )
    return (
        f'This run has already finished: {where}, so there is nothing to train. To train '
        f'longer, raise TRAIN.EPOCHS; to start a new run, give it its own folder with --tag '
        f'NAME or --output DIR.'
    )
