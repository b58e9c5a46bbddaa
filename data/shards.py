"""Tar shards as a data source that trains exactly like an image folder (docs/data.md).

    is_shard_source(path)                      does DATA.DATA_PATH name shards?
    find_shards(path, split=None)              (shard paths, _info.json path or '')
    ShardDataset(shards, ...)                  random access through the shards' indexes
    check_fingerprint(recorded, current)       refuse a resume on a changed shard set

DATA.DATA_PATH names shards when it is a ``.tar`` file, a brace pattern (``train-{0000..1023}.tar``,
``{a,b}`` lists too), or a folder holding ``.tar`` files, or train/ and val/ folders that do.
Fine-tuning reads DATA_PATH/train and DATA_PATH/val, or one folder with the timm / Hugging Face
naming: ``*-train-*.tar`` and ``*-validation-*.tar`` beside an ``_info.json``.
"""

import logging
import os
import re
import stat
import time

import numpy as np

from utils.errors import DataError
from utils.json_file import read_json

from .datasets import ImageFileDataset
from .sampler import shard_starts
from .shard_index import ShardMember, damaged_shard_message, shard_indexes

logger = logging.getLogger('simmim.data')
INFO_FILE = '_info.json'
SPLIT_NAMES = {'train': ('train',), 'val': ('validation', 'val')}  # timm/HF names first
_BRACE = re.compile(r'\{([^{}]*)\}')
_listings = {}  # folder -> (its device, inode and modification time, its .tar names): _tar_names
_RACY_NS = 2 * 10**9


def expand_braces(pattern):
    """The paths of a brace pattern in order: ``{0000..0003}`` counts (zero-padded to the width of
    its first number), ``{a,b}`` lists; several braces multiply."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r'(\d+)\.\.(\d+)', body)
    if numbers:
        first, last = numbers.groups()
        choices = [f'{i:0{len(first)}d}' for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(',')
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


def _tar_names(folder):
    """The sorted names of the .tar entries in `folder` (not hidden, as glob's '*.tar'); [] when
    it is no readable folder. One start-up asks several times (is_shard_source, find_shards, once
    per split), so a listing is kept while the folder's stat stays the same. A folder changed less
    than _RACY_NS before it was listed is listed again next time: a change within the same tick of
    the file system's clock may leave its modification time as it was (git's "racy clean")."""
    try:
        folder_stat = os.stat(folder)
        if not stat.S_ISDIR(folder_stat.st_mode):
            return []
        stamp = (folder_stat.st_dev, folder_stat.st_ino, folder_stat.st_mtime_ns)
        kept = _listings.get(folder)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        listed_at = time.time_ns()
        with os.scandir(folder) as entries:
            names = sorted(
                e.name for e in entries if e.name.endswith('.tar') and not e.name.startswith('.')
            )
    except OSError:
        return []
    if folder_stat.st_mtime_ns < listed_at - _RACY_NS:
        _listings[folder] = (stamp, names)
    return names


def _tars_in(folder):
    return [os.path.join(folder, name) for name in _tar_names(folder)]


def _split_folders(path):
    return [
        os.path.join(path, name) for name in ('train', 'val') if _tars_in(os.path.join(path, name))
    ]


def is_shard_source(path):
    """True if `path` (DATA.DATA_PATH) names tar shards rather than an image folder."""
    path = os.path.expanduser(path)
    if _BRACE.search(path) or path.endswith('.tar'):
        return True
    return os.path.isdir(path) and bool(_tars_in(path) or _split_folders(path))


def no_shards_message(path, what='No .tar shards found'):
    return (
        f'{what}: {path}. Expected a folder of .tar shards (webdataset layout: members '
        f'KEY.jpg and KEY.cls per sample), a brace pattern such as train-{{0000..1023}}.tar, '
        f'train/ and val/ shard folders, or timm/Hugging Face naming (*-train-*.tar, '
        f'*-validation-*.tar). Fix: pass the right path with --data-path (DATA.DATA_PATH), or '
        f'write shards from an image folder with python -m tools.make_shards SRC OUT.'
    )


def _info_beside(shards):
    info = os.path.join(os.path.dirname(shards[0]), INFO_FILE)
    return info if os.path.isfile(info) else ''


def _named_split(tars, split):
    """The shards of `split` among `tars`, a folder's shards with timm/HF naming
    (NAME-train-NNNN.tar)."""
    for name in SPLIT_NAMES[split]:
        shards = [s for s in tars if f'-{name}-' in os.path.basename(s)]
        if shards:
            return shards
    return []


def find_shards(path, split=None):
    """(shard paths in order, the _info.json beside them or '') for `split` (None: every shard,
    for pre-training; 'train' or 'val' for fine-tuning). Raises DataError if there are none."""
    path = os.path.expanduser(path)
    if split is not None and (_BRACE.search(path) or path.endswith('.tar')):
        raise DataError(
            f'Fine-tuning reads two splits, but DATA.DATA_PATH {path} names one set of shards. '
            f'Fix: pass the folder holding them, with train/ and val/ shard folders or the '
            f'timm/Hugging Face naming (NAME-train-NNNN.tar, NAME-validation-NNNN.tar).'
        )
    if _BRACE.search(path) or path.endswith('.tar'):
        shards = expand_braces(path)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(
                no_shards_message(
                    path,
                    f'{len(missing)} of the {len(shards)} shards named do not exist '
                    f'(first: {missing[0]})',
                )
            )
    elif split is None:
        top = _tars_in(path)
        shards = top or [s for folder in _split_folders(path) for s in _tars_in(folder)]
        if shards and not top:
            logger.warning(
                f'DATA.DATA_PATH {path} holds train/ and val/ shard folders, so pre-training '
                f'reads both. Pass DATA_PATH/train to pre-train on the training split only.'
            )
        elif _named_split(top, 'train') and _named_split(top, 'val'):
            logger.warning(
                f'DATA.DATA_PATH {path} holds train and validation shards (timm/HF naming), so '
                f'pre-training reads both. Pass a brace pattern of the train shards (e.g. '
                f'{path}/NAME-train-{{0000..1023}}.tar) to pre-train on the training split only.'
            )
    else:
        shards = _tars_in(os.path.join(path, split)) or _named_split(_tars_in(path), split)
    if not shards:
        where = os.path.join(path, split) if split and not _tars_in(path) else path
        raise DataError(
            no_shards_message(where, f'No {split or ""} shards found'.replace('  ', ' '))
        )
    info = _info_beside(shards) or (
        os.path.join(path, INFO_FILE) if os.path.isfile(os.path.join(path, INFO_FILE)) else ''
    )
    return shards, info


def read_class_names(info_file):
    """The class names an _info.json lists (``classes`` or ``class_names``; timm's files have
    none), or None."""
    if not info_file:
        return None
    info = read_json(
        info_file,
        DataError,
        'Fix or remove it (it is optional: without it the classes are numbered from the .cls '
        'labels).',
    )
    names = info.get('classes') or info.get('class_names')
    return list(names) if names else None


class _ShardSamples:
    """(ShardMember, label) by sample index, from flat arrays (no Python object per sample): the
    shards' samples one after another, `lengths` per shard. `ordinals`, when samples were left
    out, gives each kept sample's position within its shard."""

    def __init__(self, shards, index_files, lengths, offsets, sizes, labels, ordinals=None):
        self.shards, self.index_files = shards, index_files
        self.lengths, self.starts = lengths, shard_starts(lengths)
        self.offsets, self.sizes, self.labels, self.ordinals = offsets, sizes, labels, ordinals

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, index):
        shard = int(np.searchsorted(self.starts, index, side='right')) - 1
        if self.ordinals is None:
            ordinal = index - int(self.starts[shard])
        else:
            ordinal = int(self.ordinals[index])
        member = ShardMember(
            self.shards[shard],
            self.index_files[shard],
            ordinal,
            int(self.offsets[index]),
            int(self.sizes[index]),
        )
        return member, int(self.labels[index])


class ShardDataset(ImageFileDataset):
    """The samples of `shards` in order (shard by shard, tar order within), returned as
    (PIL RGB image, label) like ImageFolderDataset, with its handling of unreadable images.

    Labels come from the ``.cls`` members; `classes` from the _info.json `info_file` when it lists
    them, else the labels' range (see align_classes). With `require_labels`, samples without a
    label raise DataError (on_bad_image='error') or are left out and counted ('skip'). Damaged
    shards: see data.shard_index.shard_index. `shard_lengths` gives each shard's sample count (for
    the window sampler, data.sampler.ShardWindowSampler), `fingerprint` what a checkpoint records.
    """

    def __init__(
        self,
        shards,
        info_file='',
        on_bad_image='skip',
        min_size=0,
        rgb_conversion='careful',
        cache_dir='',
        require_labels=False,
        root=None,
    ):
        indexes = shard_indexes(shards, cache_dir, on_bad_image)
        for shard, index in zip(shards, indexes, strict=True):
            if index.problem:
                logger.warning(
                    '%s Its readable samples are used.', damaged_shard_message(shard, index)
                )
        lengths = np.array([len(i.offsets) for i in indexes], dtype=np.int64)
        offsets, sizes, labels = (
            np.concatenate([getattr(i, field) for i in indexes])
            for field in ('offsets', 'sizes', 'labels')
        )
        samples = _ShardSamples(
            shards, [i.index_file for i in indexes], lengths, offsets, sizes, labels
        )
        self.shard_names = [os.path.basename(s) for s in shards]
        self.shard_bytes = [i.shard_bytes for i in indexes]  # from the stat the index checked
        if require_labels:
            samples = _drop_unlabelled(samples, on_bad_image)
        if not len(samples):
            raise DataError(
                no_shards_message(root or shards[0], 'The shards hold no image samples')
            )
        self.shard_lengths = samples.lengths.tolist()
        names = read_class_names(info_file)
        self.classes = names if names else [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        self.info_file = info_file
        self._set_samples(
            root or os.path.dirname(shards[0]), samples, on_bad_image, min_size, rgb_conversion
        )

    @property
    def fingerprint(self):
        """What a checkpoint records of the shard set: names, sizes in bytes, sample count."""
        return {
            'format': 'shards',
            'shards': [[n, b] for n, b in zip(self.shard_names, self.shard_bytes, strict=True)],
            'samples': len(self.samples),
        }


def _drop_unlabelled(samples, on_bad_image):
    """`samples` without those lacking a .cls label (on_bad_image 'skip'), or DataError."""
    unlabelled = np.flatnonzero(samples.labels < 0)
    if not len(unlabelled):
        return samples
    first = samples[int(unlabelled[0])][0]
    if on_bad_image == 'error':
        raise DataError(
            f'{len(unlabelled)} of the {len(samples)} samples have no label (no KEY.cls member), '
            f'first {first}. Fine-tuning needs a .cls member (the class index as text) per '
            f'sample. Fix: write the shards from class sub-folders with python -m '
            f'tools.make_shards, or leave those samples out with --opts DATA.ON_BAD_IMAGE skip.'
        )
    logger.warning(
        '%d of the %d samples have no label (no KEY.cls member), first %s; they are left out '
        '(DATA.ON_BAD_IMAGE skip).',
        len(unlabelled),
        len(samples),
        first,
    )
    keep = np.flatnonzero(samples.labels >= 0)
    shard_of = np.searchsorted(samples.starts, keep, side='right') - 1
    return _ShardSamples(
        samples.shards,
        samples.index_files,
        np.bincount(shard_of, minlength=len(samples.lengths)).astype(np.int64),
        samples.offsets[keep],
        samples.sizes[keep],
        samples.labels[keep],
        ordinals=keep - samples.starts[shard_of],
    )


def align_classes(train_set, val_set):
    """Give numbered classes (no names in _info.json) the same list in both splits: the range
    of the labels of either."""
    if read_class_names(train_set.info_file) or read_class_names(val_set.info_file):
        return
    count = max(len(train_set.classes), len(val_set.classes))
    train_set.classes = val_set.classes = [str(i) for i in range(count)]


def source_fingerprint(dataset):
    """The fingerprint of the shards behind a training dataset (a wrapper with a `base`, or the
    base itself), or None for other sources."""
    return getattr(getattr(dataset, 'base', dataset), 'fingerprint', None)


def check_fingerprint(recorded, current):
    """Raise DataError if the shard set `current` (ShardDataset.fingerprint) is not the one
    `recorded` in the checkpoint being resumed; either None (not shards) passes."""
    if not recorded or not current or recorded == current:
        return
    before = {n: b for n, b in recorded.get('shards', [])}
    now = {n: b for n, b in current.get('shards', [])}
    changed = sorted(n for n in before.keys() & now.keys() if before[n] != now[n])
    gone, new = sorted(before.keys() - now.keys()), sorted(now.keys() - before.keys())
    raise DataError(
        f'The shard set changed since the checkpoint was written: it had {len(before)} shards '
        f'and {recorded.get("samples")} samples, now {len(now)} shards and '
        f'{current.get("samples")} samples (missing: {gone[:5]}, new: {new[:5]}, changed size: '
        f'{changed[:5]}). The sample order of a resumed epoch depends on the shard set, so the '
        f'run would not continue as it started. Fix: point DATA.DATA_PATH at the shards the run '
        f'started with, or start the new data as a new run (another OUTPUT, MODEL.PRETRAINED '
        f'set to the checkpoint).'
    )
