"""Start-up of the pre-training data: time to the first batch, image folder vs tar shards.

    python -m benchmarks.shard_startup [--num-images 100000] [--shard-size 1000] [--out FILE.md]

Writes --num-images small JPEGs (48x48, 100 class folders; no download) into a temporary folder,
converts them with tools.make_shards, then times build_pretrain_data + the first batch of the
DataLoader, in this process, for: the folder (every rank walks the whole tree), the shards with
their indexes built on this start (the first start after a conversion by another tool), and the
shards with cached indexes (every later start). Runs alternate so that a busy shared machine
slows both alike; the fastest and the median of --repeats are reported (the fastest is the least
disturbed by other load). The page cache is warm (the files were
just written): a cold network file system widens the gap. Also times --per-sample-images reads
of training samples in this process (one worker's rate) from each source on the same images.
"""

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.report import machine_description, write_report
from config import load_config
from data import build_pretrain_data
from data.datasets import ImageFolderDataset
from data.shard_index import INDEX_SUFFIX
from data.shards import ShardDataset, find_shards, is_shard_source
from tools.make_shards import convert

CONFIG = (
    'MODEL:\n  TYPE: vit\n  NUM_CLASSES: 0\n  VIT:\n    PATCH_SIZE: 4\n'
    'DATA:\n  IMG_SIZE: 32\n  MASK_PATCH_SIZE: 8\n  DATASET: folder\n'
    '  NUM_WORKERS: 0\n  PIN_MEMORY: False\n'
)


def write_images(folder, count, classes=100, distinct=64):
    """`count` JPEGs under `folder`/CLASS/; `distinct` different pictures, cycled."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(distinct):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(buffer, 'JPEG')
        blobs.append(buffer.getvalue())
    for c in range(classes):
        os.makedirs(os.path.join(folder, f'c{c:03d}'))
    for i in range(count):
        with open(os.path.join(folder, f'c{i % classes:03d}', f'{i:07d}.jpg'), 'wb') as f:
            f.write(blobs[i % distinct])


def first_batch_seconds(config):
    start = time.perf_counter()
    data = build_pretrain_data(config, 4)
    next(iter(data.train_loader))
    return time.perf_counter() - start, data


def listing_seconds(path):
    """The source alone: listing the folder, or reading the shard set's index."""
    start = time.perf_counter()
    ShardDataset(*find_shards(path)) if is_shard_source(path) else ImageFolderDataset(path)
    return time.perf_counter() - start


def per_sample_ms(data, count):
    sampler = data.train_loader.sampler
    sampler.set_epoch(1)
    keys = list(sampler)[:count]
    start = time.perf_counter()
    for key in keys:
        data.train_set[key]
    return (time.perf_counter() - start) / len(keys) * 1000


def measure(work, num_images, shard_size, repeats, batch_size, per_sample_images):
    folder, shards = os.path.join(work, 'images'), os.path.join(work, 'shards')
    start = time.perf_counter()
    write_images(folder, num_images)
    written = time.perf_counter() - start
    start = time.perf_counter()
    convert(folder, shards, shard_size, workers=os.cpu_count() or 1, log=lambda _: None)
    converted = time.perf_counter() - start
    cfg = os.path.join(work, 'config.yaml')
    with open(cfg, 'w') as f:
        f.write(CONFIG)
    configs = {
        name: load_config(cfg, ['DATA.DATA_PATH', path, 'DATA.BATCH_SIZE', str(batch_size)])
        for name, path in (('folder', folder), ('shards', shards))
    }
    for index in (n for n in os.listdir(shards) if n.endswith(INDEX_SUFFIX)):
        os.remove(os.path.join(shards, index))  # the first start builds them
    built, _ = first_batch_seconds(configs['shards'])
    times = {'folder': [], 'shards': []}
    listings = {'folder': [], 'shards': []}
    loaded = {}
    for _ in range(repeats):
        for name in times:
            seconds, loaded[name] = first_batch_seconds(configs[name])
            times[name].append(seconds)
            listings[name].append(listing_seconds(configs[name].DATA.DATA_PATH))
    rates = {name: per_sample_ms(loaded[name], per_sample_images) for name in times}
    return {
        'num_images': num_images,
        'num_shards': -(-num_images // shard_size),
        'write_seconds': written,
        'convert_seconds': converted,
        'shards_index_built_seconds': built,
        'folder_seconds': min(times['folder']),
        'shards_seconds': min(times['shards']),
        'folder_median_seconds': statistics.median(times['folder']),
        'shards_median_seconds': statistics.median(times['shards']),
        'folder_listing_seconds': min(listings['folder']),
        'shards_listing_seconds': min(listings['shards']),
        'folder_runs': times['folder'],
        'shards_runs': times['shards'],
        'folder_ms_per_sample': rates['folder'],
        'shards_ms_per_sample': rates['shards'],
    }


def report(result, args):
    r = result
    ratio = r['shards_seconds'] / r['folder_seconds']
    median_ratio = r['shards_median_seconds'] / r['folder_median_seconds']
    return [
        f'## Data start-up: image folder vs tar shards ({time.strftime("%Y-%m-%d")})',
        '',
        f'Command: `python -m benchmarks.shard_startup --num-images {args.num_images} '
        f'--shard-size {args.shard_size}`. Machine: {machine_description()}.',
        '',
        f'{r["num_images"]} JPEGs of 48x48 in 100 class folders ({r["write_seconds"]:.0f} s to '
        f'write), converted to {r["num_shards"]} shards by tools.make_shards in '
        f'{r["convert_seconds"]:.0f} s. Time from build_pretrain_data to the first batch '
        f'(batch {args.batch_size}, in process), fastest and median of {args.repeats}, page cache '
        f'warm:',
        '',
        '| source | seconds to first batch (fastest) | vs folder | median | vs folder |',
        '|---|---|---|---|---|',
        f'| image folder | {r["folder_seconds"]:.3f} | 1.00 | {r["folder_median_seconds"]:.3f} | '
        f'1.00 |',
        f'| shards, indexes built on this start (one run) | '
        f'{r["shards_index_built_seconds"]:.3f} | '
        f'{r["shards_index_built_seconds"] / r["folder_seconds"]:.2f} | | |',
        f'| shards, cached indexes | {r["shards_seconds"]:.3f} | {ratio:.3f} | '
        f'{r["shards_median_seconds"]:.3f} | {median_ratio:.3f} |',
        '',
        f"The source alone (listing the folder, or reading the shard set's index; fastest of "
        f'{args.repeats}): folder {r["folder_listing_seconds"]:.3f} s, shards '
        f'{r["shards_listing_seconds"]:.4f} s '
        f'({r["shards_listing_seconds"] / r["folder_listing_seconds"]:.3f}x).',
        '',
        f'One worker reading training samples (these small JPEGs, {args.per_sample_images} '
        f'samples in the epoch order): folder {r["folder_ms_per_sample"]:.3f} ms, shards '
        f'{r["shards_ms_per_sample"]:.3f} ms per sample.',
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--num-images', type=int, default=100_000)
    parser.add_argument('--shard-size', type=int, default=1000)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--per-sample-images', type=int, default=2000)
    parser.add_argument('--out', default=None, help='markdown file for the results (+ .json)')
    parser.add_argument('--work-dir', default=None, help='temporary folder (default: $TMPDIR)')
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix='shard_startup_', dir=args.work_dir)
    try:
        result = measure(
            work,
            args.num_images,
            args.shard_size,
            args.repeats,
            args.batch_size,
            args.per_sample_images,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(report(result, args), args.out, result)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
