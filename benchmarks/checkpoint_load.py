"""What the checksum check adds to loading a checkpoint (docs/resume.md, "What is verified").

Builds the Swin-B/192 pre-training model of the official 800-epoch config with an AdamW state as
after one step (about 1.1 GB in one file), writes it with its checksum record, and times, in
alternating rounds so that both see the same page cache: loading it (memory-mapped, every tensor
then copied once, as a resume does when it loads into the model), and the same with the checksum
verified. Reports the medians and the overhead.

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


def timed(path, verify):
    start = time.perf_counter()
    checkpoint = load_checkpoint_file(path, record=SIDECAR if verify else None)
    touch_every_tensor(checkpoint)
    return time.perf_counter() - start


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
        timed(path, True)  # warm the page cache
        plain, verified = [], []
        for _ in range(args.rounds):
            plain.append(timed(path, False))
            verified.append(timed(path, True))
    load, check = statistics.median(plain), statistics.median(verified)
    lines = [
        '## Checkpoint load with and without the checksum check',
        '',
        f'Machine: {machine_description()}. Swin-B/192 pre-training checkpoint with AdamW state, '
        f'{size / 1e9:.2f} GB, page cache warm; median of {args.rounds} alternating rounds.',
        '',
        '| load (mmap + one copy) | load + verify | overhead |',
        '|---|---|---|',
        f'| {load:.3f} s | {check:.3f} s | {100 * (check - load) / load:+.1f} % |',
    ]
    write_report(lines, args.output, {'bytes': size, 'load_s': plain, 'verified_s': verified})
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
