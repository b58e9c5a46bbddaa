"""Write tar shards (webdataset layout) from an image folder, for DATA.DATA_PATH (docs/data.md).

    python -m tools.make_shards SRC OUT [--shard-size 1000] [--prefix NAME] [--workers N]
                                [--shuffle-seed S]
    python -m tools.make_shards --index-only SHARDS [--workers N]   index shards written elsewhere

SRC is an image folder as training reads it: class sub-folders (one split, 'train'), a flat folder
of images (no labels), or train/ and val/ folders of class sub-folders. OUT gets, per split,
``PREFIX-SPLIT-NNNN.tar`` (timm / Hugging Face naming: splits 'train' and 'validation') holding
the samples in the order training lists the folder, each as ``KEY.EXT`` (the file's bytes
unchanged) and ``KEY.cls`` (its class index as text, in the folder's class order), plus
``_info.json`` (class names, per-split shard names, lengths and class counts) and each shard's
index. Files that do not decode are reported and left out. Each shard is written under a
temporary name and renamed when complete, so an interrupted conversion is continued by running
the same command again: finished shards are kept.

--index-only builds the indexes of existing shards (a folder or brace pattern, as DATA.DATA_PATH
takes them, e.g. downloaded from the Hugging Face hub) in --workers processes, so that the first
training start does not spend that time on every rank.
"""

import argparse
import glob
import io
import json
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from data.datasets import ImageFolderDataset, load_image
from data.shard_index import shard_index
from data.shards import INFO_FILE, find_shards
from engine.launch import run_tool
from utils.atomic_write import atomic_write
from utils.errors import DataError

PROGRESS_FILE = '_progress.json'
SPLITS = (('train', 'train'), ('val', 'validation'))  # SRC sub-folder, split name in OUT


def list_splits(source):
    """[(split name, ImageFolderDataset)] of `source`: train/ and val/ when it has both (val's
    classes must be train's), else the whole folder as 'train'."""
    if all(os.path.isdir(os.path.join(source, folder)) for folder, _ in SPLITS):
        splits = [(name, ImageFolderDataset(os.path.join(source, f))) for f, name in SPLITS]
        train_classes, val_classes = splits[0][1].classes, splits[1][1].classes
        if val_classes != train_classes:
            extra = sorted(set(val_classes) - set(train_classes))
            raise DataError(
                f'{source}/val must have the class sub-folders of {source}/train (same names, '
                f'same order: the labels are indices into one list); val has '
                f'{len(val_classes)}, train {len(train_classes)}, only in val: {extra[:10]}. '
                f'Fix: add or remove class folders so both lists match.'
            )
        return splits
    return [('train', ImageFolderDataset(source))]


def member_base(path, root):
    """(key, extension) for the file `path` under `root`: its relative path without extension,
    dots in the name replaced (a key ends at the first dot), and the extension lower-cased."""
    relative = os.path.relpath(path, root)
    stem, extension = os.path.splitext(relative)
    folder, name = os.path.split(stem)
    return os.path.join(folder, name.replace('.', '_')), extension.lstrip('.').lower()


class _FileInMemory(io.BytesIO):
    """The bytes of the file `path`, read once, that load_image takes in place of the path (it has
    the open() data.datasets.open_image_file looks for); PIL's messages name the file."""

    def __init__(self, path):
        with open(path, 'rb') as f:
            super().__init__(f.read())
        self.name = path

    def open(self):
        return self

    def __repr__(self):
        return f'<file {self.name!r}>'


def check_image(path):
    """(bytes, '') for a file that decodes, (None, reason) otherwise; the file is read once."""
    try:
        file = _FileInMemory(path)
        data = file.getvalue()
        load_image(file)
        return data, ''
    except Exception as err:  # PIL raises many types for broken files
        return None, f'{type(err).__name__}: {err}'


def _add(archive, name, data, mtime):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    archive.addfile(info, io.BytesIO(data))


def write_shard(path, samples, root, labelled, pool):
    """Write `samples` [(file, label)] as the shard `path` (atomically: a temporary name, fsynced,
    then renamed); return (sample count, per-label counts, [[file, reason]] of files left out)."""
    for stale in glob.glob(glob.escape(path) + '*.tmp'):  # left by a run killed while writing it
        os.remove(stale)
    counts, skipped = {}, []
    files = [file for file, _ in samples]

    def write(f):
        checked = pool.map(check_image, files, chunksize=8) if pool else map(check_image, files)
        with tarfile.open(fileobj=f, mode='w', format=tarfile.PAX_FORMAT) as archive:
            for (file, label), (data, reason) in zip(samples, checked, strict=True):
                if data is None:
                    skipped.append([file, reason])
                    continue
                key, extension = member_base(file, root)
                mtime = int(os.stat(file).st_mtime)
                _add(archive, f'{key}.{extension}', data, mtime)
                if labelled:
                    _add(archive, f'{key}.cls', str(label).encode(), mtime)
                counts[label] = counts.get(label, 0) + 1

    atomic_write(path, write)
    return len(samples) - len(skipped), counts, skipped


def _write_json(path, value):
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def _load_progress(out, plan):
    """The progress record of an earlier run on `out`, checked against this run's `plan`."""
    path = os.path.join(out, PROGRESS_FILE)
    if not os.path.exists(path):
        return {**plan, 'shards': {}}
    with open(path) as f:
        progress = json.load(f)
    if {k: progress.get(k) for k in plan} != plan:
        raise DataError(
            f'{out} holds a conversion of another source or with other settings ({path}: '
            f'source {progress.get("source")}, shard size {progress.get("shard_size")}, files '
            f'{progress.get("files")}; now {plan["source"]}, {plan["shard_size"]}, '
            f'{plan["files"]}). Fix: write to another OUT folder, or delete {out} to start over.'
        )
    return progress


class Progress:
    """A one-line progress bar on stderr: shards and images done, rate and time left."""

    def __init__(self, total_images):
        self.total, self.done, self.start = total_images, 0, time.time()

    def update(self, images, label):
        self.done += images
        elapsed = max(time.time() - self.start, 1e-6)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate else 0
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        print(
            f'\r[{"#" * filled}{"." * (width - filled)}] {self.done}/{self.total} images, '
            f'{label}, {rate:.0f} images/s, {left / 60:.1f} min left',
            end='',
            file=sys.stderr,
            flush=True,
        )


def convert(source, out, shard_size=1000, prefix=None, workers=1, log=print, shuffle_seed=None):
    """Write the shards of `source` into `out` (see the module docstring); return the _info.json
    dict. With `shuffle_seed`, each split's samples are shuffled (seeded) before they are cut into
    shards, so that every shard mixes classes (for DATA.SHARD_SHUFFLE window)."""
    source, out = os.path.abspath(os.path.expanduser(source)), os.path.expanduser(out)
    prefix = prefix or os.path.basename(source.rstrip(os.sep)) or 'data'
    splits = list_splits(source)
    classes = splits[0][1].classes
    plan = {
        'source': source,
        'shard_size': shard_size,
        'shuffle_seed': shuffle_seed,
        'files': {name: len(dataset.samples) for name, dataset in splits},
    }
    os.makedirs(out, exist_ok=True)
    progress = _load_progress(out, plan)
    bar = Progress(sum(plan['files'].values()))
    info = {'name': prefix, 'source': source, 'classes': classes, 'num_classes': len(classes)}
    info['splits'], skipped_all = {}, []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for name, dataset in splits:
            samples = dataset.samples
            if shuffle_seed is not None:
                order = np.random.default_rng(shuffle_seed).permutation(len(samples))
                samples = [samples[i] for i in order]
            count = -(-len(samples) // shard_size)
            width = max(4, len(str(count - 1)))
            filenames = [f'{prefix}-{name}-{i:0{width}d}.tar' for i in range(count)]
            for i, filename in enumerate(filenames):
                path = os.path.join(out, filename)
                chunk = samples[i * shard_size : (i + 1) * shard_size]
                if not (filename in progress['shards'] and os.path.exists(path)):
                    written = write_shard(path, chunk, dataset.root, bool(classes), pool)
                    shard_index(path)  # the index training reads, built now
                    progress['shards'][filename] = dict(
                        zip(('samples', 'class_counts', 'skipped'), written, strict=True)
                    )
                    _write_json(os.path.join(out, PROGRESS_FILE), progress)
                bar.update(len(chunk), f'{name} shard {i + 1}/{count}')
            records = [progress['shards'][f] for f in filenames]
            class_counts = {}
            for record in records:
                for label, n in record['class_counts'].items():
                    class_counts[int(label)] = class_counts.get(int(label), 0) + n
            skipped_all += [s for record in records for s in record['skipped']]
            info['splits'][name] = {
                'name': name,
                'num_samples': sum(r['samples'] for r in records),
                'filenames': filenames,
                'shard_lengths': [r['samples'] for r in records],
                'class_counts': {
                    (classes[label] if classes else str(label)): class_counts[label]
                    for label in sorted(class_counts)
                },
            }
    finally:
        if pool is not None:
            pool.shutdown()
        print(file=sys.stderr)
    info['skipped'] = skipped_all
    _write_json(os.path.join(out, INFO_FILE), info)
    for file, reason in skipped_all:
        log(f'left out (does not decode): {file} ({reason})')
    return info


def index_only(path, workers):
    """Build the index of every shard `path` names; return how many shards and samples."""
    shards, _ = find_shards(path)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        lengths = list(pool.map(_index_length, shards))
    return len(shards), sum(lengths)


def _index_length(shard):
    return len(shard_index(shard).offsets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('source', metavar='SRC', help='image folder')
    parser.add_argument('out', metavar='OUT', nargs='?', help='folder for the shards')
    parser.add_argument('--shard-size', type=int, default=1000, help='images per shard')
    parser.add_argument('--prefix', default=None, help="shard name prefix (default: SRC's name)")
    parser.add_argument(
        '--shuffle-seed',
        type=int,
        default=None,
        help="shuffle each split's samples (seeded) before sharding: every shard mixes classes "
        "(for DATA.SHARD_SHUFFLE window); default: the folder's order",
    )
    parser.add_argument(
        '--workers', type=int, default=min(8, os.cpu_count() or 1), help='decode checks in parallel'
    )
    parser.add_argument(
        '--index-only', action='store_true', help='SRC names shards: only build their indexes'
    )
    args = parser.parse_args(argv)
    if args.index_only:
        count, samples = index_only(args.source, args.workers)
        print(f'indexed {count} shards, {samples} samples')
        return 0
    if args.out is None:
        parser.error('OUT is required (the folder for the shards)')
    if args.shard_size < 1:
        parser.error('--shard-size must be at least 1')
    info = convert(
        args.source,
        args.out,
        args.shard_size,
        args.prefix,
        args.workers,
        shuffle_seed=args.shuffle_seed,
    )
    for name, split in info['splits'].items():
        print(
            f'{name}: {split["num_samples"]} images in {len(split["filenames"])} shards, '
            f'{len(info["classes"])} classes'
        )
    print(f'{len(info["skipped"])} files left out; wrote {os.path.join(args.out, INFO_FILE)}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
