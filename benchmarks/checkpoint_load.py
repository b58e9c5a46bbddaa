"""What the checksum check adds to loading a checkpoint (docs/resume.md, "What is verified").

Builds the Swin-B/192 pre-training model of the official 800-epoch config with an AdamW state as
after one step (about 1.1 GB in one file), writes it with its checksum record, and times three
ways of reading it back, each followed by one copy of every tensor (what loading into the model
does), in alternating rounds so that all see the same page cache:

- before: `torch.load` reading the file into memory (how checkpoints were loaded before checksums);
- mapped: `torch.load(mmap=True)`, how they are loaded now, without the check;
- mapped + verified: the same with the checksum checked (what every load does now).

With the page cache warm (a file read again) and cold (its pages dropped before each load, as on
a first read from disk; the disk of the machine decides those numbers).

    python -m benchmarks.checkpoint_load [--rounds 5] [--output benchmarks/checkpoint_load.md]
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from benchmarks.report import machine_description, write_report
from config import load_config
from models import build_model
from optimizer import build_optimizer
from utils.atomic_write import atomic_save
from utils.safe_load import SIDECAR, load_checkpoint_file

WAYS = ('before', 'mapped', 'verified')
CACHES = ('warm', 'cold')
SWIN_B = 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'


def swin_b_checkpoint():
    config = load_config(SWIN_B)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments: the checkpoint's full size
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 0}


def touch_every_tensor(tree):
    """Copy every tensor once (what loading into a model does with a mapped file)."""
    if torch.is_tensor(tree):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: touch_every_tensor(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [touch_every_tensor(v) for v in tree]
    return tree


def evict(path):
    """Drop the file's pages from the page cache (as on a first read from disk after a restart)."""
    with open(path, 'rb') as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(path, how, cold=False):
    if cold:
        evict(path)
    start = time.perf_counter()
    if how == 'before':
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    else:
        checkpoint = load_checkpoint_file(path, record=SIDECAR if how == 'verified' else None)
    touch_every_tensor(checkpoint)
    return time.perf_counter() - start


def _change(new, old):
    return f'{100 * (new - old) / old:+.0f} %'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--output', default=None, help='markdown file for the results')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'ckpt_epoch_0.pth')
        atomic_save(swin_b_checkpoint(), path, checksum=True)
        size = os.path.getsize(path)
        timed(path, 'verified')  # warm the page cache
        times = {f'{how} {cache}': [] for cache in CACHES for how in WAYS}
        for _ in range(args.rounds):
            for cache in CACHES:
                for how in WAYS:
                    times[f'{how} {cache}'].append(timed(path, how, cold=cache == 'cold'))
    lines = [
        '## Checkpoint load with and without the checksum check',
        '',
        f'Machine: {machine_description()}. Swin-B/192 pre-training checkpoint with AdamW state, '
        f'{size / 1e9:.2f} GB; {args.rounds} alternating rounds, each load followed by one copy '
        f'of every tensor.',
        '',
        '| page cache | | before (read) | mapped | mapped + verified | vs before | vs mapped |',
        '|---|---|---|---|---|---|---|',
    ]
    for cache in CACHES:
        for name, pick in (('fastest', min), ('median', statistics.median)):
            value = {how: pick(times[f'{how} {cache}']) for how in WAYS}
            lines.append(
                f'| {cache} | {name} | {value["before"]:.3f} s | {value["mapped"]:.3f} s | '
                f'{value["verified"]:.3f} s | {_change(value["verified"], value["before"])} | '
                f'{_change(value["verified"], value["mapped"])} |'
            )
    write_report(lines, args.output, {'bytes': size, **times})
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
