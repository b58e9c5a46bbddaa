"""The member-offset index of one tar shard, and reading a sample by seek + read.

    shard_index(shard, cache_dir, on_bad_image) -> ShardIndex   built once, then cached
    shard_indexes(shards, cache_dir, on_bad_image) -> [ShardIndex]   through one file per set
    ShardMember(shard, index_file, ordinal, offset, size)       one image, readable anywhere

A shard is a plain (uncompressed) tar in the webdataset layout: the members of one sample share a
key (the member name up to the first dot of its base name) and follow each other, e.g.
``n01440764/n01440764_10026.jpeg`` and ``n01440764/n01440764_10026.cls``. The index holds, per
sample, the byte offset and size of its image member and the label from its ``.cls`` member (-1
without one), so a sample is read with one positioned read and no tar parsing. It is stored beside
the shard as ``NAME.tar.index.npz`` (or in a cache folder when the shard's folder is read-only)
and records the shard's size and modification time: a shard that changed is indexed again. A set
of shards also gets one combined file (``_set-DIGEST.index.npz``, the digest over the shards' paths,
sizes and times), so a start reads one file rather than one per shard.
Why an own index rather than webdataset or wids: docs/data.md.
"""

import hashlib
import io
import logging
import os
from typing import NamedTuple

import numpy as np

from utils.atomic_write import atomic_write
from utils.errors import DataError

from .datasets import IMG_EXTENSIONS, check_on_bad_image
from .tar_members import (
    TAR_BLOCK,
    ListingStopped,
    UnusualHeader,
    plain_tar_members,
    tarfile_members,
)

INDEX_VERSION = 1
INDEX_SUFFIX = '.index.npz'
DEFAULT_CACHE = os.path.join('~', '.cache', 'simmim', 'shard-index')
IMAGE_MEMBER_EXTENSIONS = tuple(e.lstrip('.') for e in IMG_EXTENSIONS)
logger = logging.getLogger('simmim.data')


class ShardIndex(NamedTuple):
    """One shard's samples in tar order: image member offsets and sizes in bytes, labels (-1: no
    ``.cls`` member), and `problem`, a sentence when the shard is damaged ('' if whole)."""

    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    labels: np.ndarray  # int64
    problem: str
    index_file: str  # where the index is stored ('' when it could not be written)
    shard_bytes: int  # the shard's size when this index was checked against it


def member_key(name):
    """(key, extension) of a tar member name, webdataset's convention: the key is the name up to
    the first dot of its base name, the extension the rest, lower-cased."""
    folder, base = os.path.split(name)
    stem, dot, extension = base.partition('.')
    return os.path.join(folder, stem) if folder else stem, extension.lower() if dot else ''


def _read_label(f, offset, size):
    f.seek(offset)
    text = f.read(size).decode('ascii', 'replace').strip()
    try:
        return int(text)
    except ValueError:
        return -2  # a .cls member that holds no integer: reported as damaged


def _end_marker_problem(f, shard_size, data_end):
    """A sentence if the archive does not end with the two zero blocks tar writes after its last
    member (a cut-off download, or a damaged header that stopped the listing); '' otherwise."""
    end = -(-data_end // TAR_BLOCK) * TAR_BLOCK
    f.seek(end)
    tail = f.read(2 * TAR_BLOCK)
    if len(tail) == 2 * TAR_BLOCK and not tail.strip(b'\0'):
        return ''
    if not tail.strip(b'\0'):
        return f'it ends at byte {shard_size} without the end-of-archive blocks (truncated)'
    return f'the tar header at byte {end} is not valid (the file is damaged or cut off there)'


def build_index(shard):
    """(names, offsets, sizes, labels, problem) of `shard`, from its tar headers (and the few bytes
    of each .cls member). Members reaching past the end of the file are left out and named in
    `problem`."""
    shard_size = os.path.getsize(shard)
    with open(shard, 'rb') as f:
        try:
            return _index_members(f, shard_size, plain_tar_members(f))
        except UnusualHeader:
            return _index_members(f, shard_size, tarfile_members(f))


def _index_members(f, shard_size, members):
    names, offsets, sizes, labels = [], [], [], []
    problem, data_end, previous_key = '', 0, None
    try:
        for name, offset, size in members:
            if offset + size > shard_size:
                problem = f'member {name} runs past the end of the file (truncated)'
                break
            data_end = offset + size
            key, extension = member_key(name)
            if key != previous_key:  # a new sample (members of one key are consecutive)
                names.append('')
                offsets.append(-1)
                sizes.append(0)
                labels.append(-1)
                previous_key = key
            if extension in IMAGE_MEMBER_EXTENSIONS and offsets[-1] < 0:
                names[-1], offsets[-1], sizes[-1] = name, offset, size
            elif extension == 'cls':
                labels[-1] = _read_label(f, offset, size)  # the readers seek to their next header
    except ListingStopped as stopped:
        problem = str(stopped)
    if not problem:
        problem = _end_marker_problem(f, shard_size, data_end)
    bad_labels = [names[i] for i, label in enumerate(labels) if label == -2]
    if bad_labels and not problem:
        problem = f'the .cls member of {bad_labels[0]} holds no integer label'
    keep = [i for i, offset in enumerate(offsets) if offset >= 0]  # keys with an image member
    return (
        [names[i] for i in keep],
        [offsets[i] for i in keep],
        [sizes[i] for i in keep],
        [max(labels[i], -1) for i in keep],
        problem,
    )


def index_files(shard, cache_dir=''):
    """Where the index of `shard` may live: beside it, then in `cache_dir` (default
    ~/.cache/simmim/shard-index) under a name unique to the shard's real path."""
    real = os.path.realpath(shard)
    digest = hashlib.sha1(real.encode()).hexdigest()[:16]
    cache = os.path.expanduser(cache_dir or DEFAULT_CACHE)
    return [
        shard + INDEX_SUFFIX,
        os.path.join(cache, f'{digest}-{os.path.basename(shard)}{INDEX_SUFFIX}'),
    ]


def _stamp(shard):
    stat = os.stat(shard)
    return np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def _read_stored(path, stamp_key, stamp, build, what):
    """build(stored) from the npz file `path` if its `stamp_key` array equals `stamp`, else None;
    a file that cannot be read is reported as `what` and treated as absent (it is rebuilt)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as stored:
            return build(stored) if np.array_equal(stored[stamp_key], stamp) else None
    except Exception as err:  # zip, pickle and key errors: any damage means rebuild
        logger.warning(
            'The %s %s cannot be read (%s: %s); it is rebuilt.', what, path, type(err).__name__, err
        )
        return None


def _load(path, stamp):
    """The ShardIndex stored at `path` if it belongs to this version of the shard, else None."""

    def build(stored):
        return ShardIndex(
            *(stored[k].astype(np.int64) for k in ('offsets', 'sizes', 'labels')),
            str(stored['problem']),
            path,
            int(stamp[1]),
        )

    return _read_stored(path, 'stamp', stamp, build, 'shard index')


def _save_arrays(path, **arrays):
    """Write `arrays` as the npz file `path` atomically (utils.atomic_write); False if it cannot be
    written (a read-only folder, a full disk)."""
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return True
    except OSError:
        return False


def _save(path, stamp, names, offsets, sizes, labels, problem):
    return _save_arrays(
        path,
        stamp=stamp,
        names=np.array(names, dtype=str),
        offsets=np.array(offsets, dtype=np.int64),
        sizes=np.array(sizes, dtype=np.int64),
        labels=np.array(labels, dtype=np.int64),
        problem=np.array(problem),
    )


def shard_index(shard, cache_dir='', on_bad_image='skip'):
    """The ShardIndex of `shard`, from its cached index when that matches the shard's size and
    modification time, else built (and cached beside the shard, or in `cache_dir` when that
    folder is read-only). A damaged shard raises DataError with on_bad_image='error'; with 'skip'
    its readable samples are kept and `problem` says what was lost."""
    return _shard_index(shard, _stamp(shard), cache_dir, on_bad_image)


def _shard_index(shard, stamp, cache_dir, on_bad_image):
    check_on_bad_image(on_bad_image)
    candidates = index_files(shard, cache_dir)
    index = next((i for i in (_load(p, stamp) for p in candidates) if i is not None), None)
    if index is None:
        names, offsets, sizes, labels, problem = build_index(shard)
        written = next(
            (p for p in candidates if _save(p, stamp, names, offsets, sizes, labels, problem)), ''
        )
        if not written:
            logger.warning(
                'The index of %s could not be written beside it or in %s; it is rebuilt on '
                'every start. Fix: set DATA.SHARD_INDEX_CACHE to a writable folder.',
                shard,
                os.path.dirname(candidates[1]),
            )
        index = ShardIndex(
            *(np.array(values, dtype=np.int64) for values in (offsets, sizes, labels)),
            problem,
            written,
            int(stamp[1]),
        )
    if index.problem and on_bad_image == 'error':
        raise DataError(damaged_shard_message(shard, index))
    return index


def _set_files(shards, stamps, cache_dir):
    key = '\n'.join(os.path.realpath(s) for s in shards).encode() + stamps.tobytes()
    name = f'_set-{hashlib.sha1(key).hexdigest()[:16]}{INDEX_SUFFIX}'
    cache = os.path.expanduser(cache_dir or DEFAULT_CACHE)
    return [os.path.join(os.path.dirname(shards[0]), name), os.path.join(cache, name)]


def _load_set(path, stamps):
    """The ShardIndexes stored in the set file `path`, or None (absent, stale or unreadable)."""

    def build(stored):
        ends = np.cumsum(stored['lengths'])[:-1]
        columns = [np.split(stored[k], ends) for k in ('offsets', 'sizes', 'labels')]
        return [
            ShardIndex(offsets, sizes, labels, str(problem), str(index_file), int(stamp[1]))
            for offsets, sizes, labels, problem, index_file, stamp in zip(
                *columns, stored['problems'], stored['index_files'], stamps, strict=True
            )
        ]

    return _read_stored(path, 'stamps', stamps, build, 'shard set index')


def _save_set(path, stamps, indexes):
    return _save_arrays(
        path,
        stamps=stamps,
        lengths=np.array([len(i.offsets) for i in indexes], dtype=np.int64),
        **{k: np.concatenate([getattr(i, k) for i in indexes]) for k in ShardIndex._fields[:3]},
        problems=np.array([i.problem for i in indexes], dtype=str),
        index_files=np.array([i.index_file for i in indexes], dtype=str),
    )


def shard_indexes(shards, cache_dir='', on_bad_image='skip'):
    """[shard_index(shard) for shard in shards], read from the set's combined file when it matches
    every shard's size and modification time (else from the shards' own indexes, building those
    missing, and the combined file written). Damaged shards: as shard_index."""
    check_on_bad_image(on_bad_image)
    stamps = np.stack([_stamp(s) for s in shards])
    candidates = _set_files(shards, stamps, cache_dir)
    indexes = next((i for i in (_load_set(p, stamps) for p in candidates) if i is not None), None)
    if indexes is None:
        indexes = [
            _shard_index(s, stamp, cache_dir, 'skip')
            for s, stamp in zip(shards, stamps, strict=True)
        ]
        next((p for p in candidates if _save_set(p, stamps, indexes)), None)
    for shard, index in zip(shards, indexes, strict=True):
        if index.problem and on_bad_image == 'error':
            raise DataError(damaged_shard_message(shard, index))
    return indexes


def damaged_shard_message(shard, index):
    return (
        f'The shard {shard} is damaged: {index.problem}; {len(index.offsets)} samples before that '
        f'point can be read. Fix: download or write it again (python -m tools.make_shards writes '
        f'shards from an image folder), or train on its readable samples with --opts '
        f'DATA.ON_BAD_IMAGE skip.'
    )


def member_name(index_file, ordinal):
    """The image member name of sample `ordinal` in a shard whose index is `index_file`."""
    try:
        with np.load(index_file) as stored:
            return str(stored['names'][ordinal])
    except Exception:  # no index file (unwritable, or removed since): name it by position
        return f'sample {ordinal}'


_open_shards = {}  # shard path -> file descriptor, in this process (see _descriptor)
_MAX_OPEN = 64


def _descriptor(shard):
    """A read-only descriptor of `shard`, kept open for later reads in this process: workers
    forked from a process with open shards must not share its descriptors, so the table is
    keyed by process id as well."""
    key = (os.getpid(), shard)
    fd = _open_shards.get(key)
    if fd is None:
        if len(_open_shards) >= _MAX_OPEN:
            stale_key = next(iter(_open_shards))
            stale = _open_shards.pop(stale_key)
            if stale_key[0] == os.getpid():
                os.close(stale)
        fd = os.open(shard, os.O_RDONLY)
        _open_shards[key] = fd
    return fd


class ShardMember(NamedTuple):
    """One sample's image in a shard; ``open()`` gives its bytes as a file object (one
    positioned read), str() names the shard and member."""

    shard: str
    index_file: str
    ordinal: int  # the sample's position in its shard
    offset: int
    size: int

    def read(self):
        data = os.pread(_descriptor(self.shard), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(
                f'{self.shard} ended after {len(data)} of the {self.size} bytes of a member'
            )
        return data

    def open(self):
        return io.BytesIO(self.read())

    def __str__(self):
        return f'{self.shard}:{member_name(self.index_file, self.ordinal)}'
