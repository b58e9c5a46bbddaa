"""Estimate per-GPU memory of SimMIM pre-training under DDP and FSDP, with and without activation
checkpointing, and the largest batch per GPU that fits.

    python -m tools.plan_memory \
        --cfg configs/swinv2_huge__800ep/simmim_pretrain__swinv2_huge__img192_window12__800ep.yaml \
        --gpus 16 --gpu-memory 80 [--batch-size 128] [--precision bf16|fp32] [--opts KEY VALUE ...]

Weights, gradients and AdamW state are counted from the model built on the meta device;
activations are measured by one forward pass of a copy with one block per stage (on this machine's
GPU if it has one, else on the CPU with the fused-attention stand-in; see engine/memory_plan.py for
the model and benchmarks/RESULTS.md for how it compares with measured peaks). "Fits" keeps
--reserve of the card free for the CUDA context, cuBLAS/NCCL workspaces and fragmentation. The
largest batch is searched up to 4096 images per GPU; a batch at that cap is shown as ">= 4096".
Exit codes: 0 done, 2 usage or config error (a batch below 1, a NaN, infinite or non-positive
--gpu-memory among them).
"""

import argparse
import math
import os
import sys

import torch

from config import load_config
from engine.launch import run_tool
from engine.memory_plan import (
    BATCH_SEARCH_LIMIT,
    GIB,
    estimate,
    largest_batch,
    measure_activations,
    model_stats,
)
from engine.precision import amp_enabled

SETTINGS = [('ddp', False), ('ddp', True), ('fsdp', False), ('fsdp', True)]


def plan_table(stats, activations, gpus, budget, batch, precision):
    """Markdown lines: one row per (sharding, checkpointing)."""
    lines = [
        f'| sharding | act. ckpt | weights | grads | AdamW | activations | other | peak at '
        f'batch {batch} | fits | largest batch/GPU |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for sharding, checkpointing in SETTINGS:

        def peak(b, sharding=sharding, checkpointing=checkpointing):
            return estimate(stats, activations, b, gpus, sharding, checkpointing, precision).peak

        e = estimate(stats, activations, batch, gpus, sharding, checkpointing, precision)
        best = largest_batch(lambda b: peak(b) <= budget)
        best = f'>= {best}' if best == BATCH_SEARCH_LIMIT else best or 'none'  # search capped
        gib = [
            f'{v / GIB:.1f}'
            for v in (e.weights, e.gradients, e.optimizer, e.activations, e.other, e.peak)
        ]
        lines.append(
            f'| {sharding} | {"on" if checkpointing else "off"} | {" | ".join(gib)} | '
            f'{"yes" if e.peak <= budget else "no"} | {best} |'
        )
    return lines


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cfg', required=True, metavar='FILE', help='pre-training config')
    parser.add_argument('--gpus', type=int, default=8, help='total number of GPUs (ranks)')
    parser.add_argument('--gpu-memory', type=float, default=80, help='GiB per GPU')
    parser.add_argument('--batch-size', type=int, help='images per GPU (default: DATA.BATCH_SIZE)')
    parser.add_argument(
        '--precision',
        choices=['bf16', 'fp32'],
        help='default: bf16 unless the config turns autocast off',
    )
    parser.add_argument(
        '--reserve', type=float, default=0.1, help='fraction of the card kept free (default 0.1)'
    )
    parser.add_argument(
        '--device',
        default='cuda' if torch.cuda.is_available() else 'cpu',
        help='where activations are measured (default: a GPU if present)',
    )
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE')
    args = parser.parse_args(argv)
    # NaN fails every comparison and inf passes `> 0`: both are refused by name.
    if args.gpus < 1 or not 0 < args.gpu_memory < math.inf or not 0 <= args.reserve < 1:
        parser.error(
            f'--gpus must be >= 1 (got {args.gpus}), --gpu-memory a finite number of GiB > 0 '
            f'(got {args.gpu_memory:g}) and --reserve in [0, 1) (got {args.reserve:g}).'
        )
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1 image per GPU (got {args.batch_size}).')
    config = load_config(args.cfg, args.opts)
    precision = args.precision or ('bf16' if amp_enabled(config) else 'fp32')
    batch = args.batch_size or config.DATA.BATCH_SIZE
    stats = model_stats(config)
    activations = measure_activations(
        os.path.abspath(args.cfg), tuple(args.opts), args.device, 'cuda', precision
    )
    budget = args.gpu_memory * GIB * (1 - args.reserve)
    print(
        f'{config.TAG}: {stats.params / 1e6:.1f} M parameters, {args.gpus} GPU(s) of '
        f'{args.gpu_memory:g} GiB ({budget / GIB:.1f} GiB usable), {precision}, activations '
        f'measured on {args.device}; GiB per GPU:\n'
    )
    print('\n'.join(plan_table(stats, activations, args.gpus, budget, batch, precision)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 usage or config error; failures print one paragraph."""
    return run_tool(_main, argv)


if __name__ == '__main__':
    sys.exit(main())
