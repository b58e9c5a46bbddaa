"""Checksums of the files a run writes, and their check when the files are read back.

A checkpoint file ``NAME`` gets a record ``NAME.checksum`` beside it (JSON: algorithm, size,
digest), computed from the bytes as they are written, so nothing is read twice. A sharded
checkpoint keeps the records of its files in its COMPLETE marker (checkpoint/sharded.py). xxh3-64
hashes at memory speed (about 16 GB/s on one core), so verifying a file costs about one read of
it from the page cache (docs/resume.md).

    HashingWriter(file)              a binary file that hashes what goes through it
    file_record(path)                {'algorithm', 'size', 'digest'} of a file's bytes
    check_file(path, record, what)   raise CheckpointError unless the file matches `record`
    read_sidecar(path)               the record beside `path`, or None
"""

import json
import os

import xxhash

from utils.errors import CheckpointError
from utils.json_file import read_json

ALGORITHM = 'xxh3_64'
SIDECAR_SUFFIX = '.checksum'
_CHUNK = 1 << 24


def sidecar_path(path):
    return path + SIDECAR_SUFFIX


class HashingWriter:
    """Wraps a binary file opened for writing; `record()` describes the bytes written so far."""

    def __init__(self, file):
        self.file = file
        self.hash = xxhash.xxh3_64()
        self.size = 0

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def record(self):
        return {'algorithm': ALGORITHM, 'size': self.size, 'digest': self.hash.hexdigest()}


def file_record(path):
    """{'algorithm', 'size', 'digest'} of the bytes of the file `path`."""
    digest, size = xxhash.xxh3_64(), 0
    buffer = bytearray(_CHUNK)  # one reused buffer: no new mapping to fault in, no allocations
    view = memoryview(buffer)
    with open(path, 'rb', buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
            size += count
    return {'algorithm': ALGORITHM, 'size': size, 'digest': digest.hexdigest()}


def check_file(path, record, what='checkpoint'):
    """Raise a CheckpointError naming `path` unless its bytes match `record` (a dict of
    file_record's keys)."""
    if record.get('algorithm') != ALGORITHM:
        raise CheckpointError(
            f'{what} {path}: its checksum record uses {record.get("algorithm")!r}, which this '
            f'version cannot check (it writes {ALGORITHM}). Use a checkpoint written by this '
            f'version, or delete the record to load the file unverified.'
        )
    size = os.path.getsize(path)
    if size != record.get('size'):
        raise CheckpointError(
            f'{what} {path} is {size} bytes but was written with {record.get("size")}: it is '
            f'truncated or was changed after it was written (an interrupted copy, a disk fault). '
            f'Use an earlier checkpoint or copy the file again.'
        )
    if file_record(path)['digest'] != record.get('digest'):
        raise CheckpointError(
            f'{what} {path} does not match the checksum recorded when it was written (its size '
            f'is unchanged): its bytes were damaged since (bit rot, a bad copy, a disk fault). '
            f'Use an earlier checkpoint or copy the file again.'
        )


def write_sidecar(path, record):
    """Write `record` beside `path` (atomically: a temporary file renamed over the record)."""
    target = sidecar_path(path)
    tmp = f'{target}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def read_sidecar(path):
    """The checksum record beside `path`, or None when there is none (an official or older
    checkpoint). An unreadable record is a CheckpointError."""
    target = sidecar_path(path)
    if not os.path.isfile(target):
        return None
    record = read_json(
        target,
        CheckpointError,
        f'It is the checksum record of {path}: delete it to load the file unverified, or use an '
        f'earlier checkpoint.',
    )
    if not isinstance(record, dict):
        raise CheckpointError(f'{target} is not a checksum record (a JSON object expected).')
    return record
