"""Convert a sharded checkpoint directory (TRAIN.SHARDING fsdp) into one .pth file.

    python -m tools.convert_checkpoint output/simmim_pretrain/TAG/ckpt_epoch_799 ckpt_epoch_799.pth
    python -m tools.convert_checkpoint SHARDED_DIR OUT.pth --model-only   # no optimizer state

The file has the keys of the single-file checkpoints (model with the official names, optimizer,
lr_scheduler, epoch, config, position, rng_states, ...), so fine-tuning (--pretrained), --eval,
--resume under DDP and export read it like any other. It runs in one process without a process
group and needs CPU memory for the whole model (and, without --model-only, its AdamW state: three
times as much). Exit codes: 0 written, 1 unreadable checkpoint or failed write, 2 usage error.
"""

import argparse
import os
import sys

from checkpoint.sharded import read_sharded_checkpoint
from utils.atomic_write import atomic_save
from utils.errors import CheckpointError, CheckpointWriteError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        'sharded_dir', help='a ckpt_epoch_* directory written under TRAIN.SHARDING fsdp'
    )
    parser.add_argument('output', help='the .pth file to write')
    parser.add_argument(
        '--model-only',
        action='store_true',
        help='leave the optimizer state out (enough for --pretrained and --eval)',
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.sharded_dir):
        parser.error(
            f'{args.sharded_dir} is not a directory; give a sharded checkpoint directory '
            f'(ckpt_epoch_N or ckpt_epoch_N_step_K written under TRAIN.SHARDING fsdp).'
        )
    try:
        checkpoint = read_sharded_checkpoint(args.sharded_dir, model_only=args.model_only)
        atomic_save(checkpoint, args.output, checksum=True)
    except (CheckpointError, CheckpointWriteError) as e:
        print(f'Error: {e}', file=sys.stderr)
        return 1
    values = sum(t.numel() for t in checkpoint['model'].values())
    print(
        f'{args.output}: {len(checkpoint["model"])} tensors, {values:,} values (epoch '
        f'{checkpoint["epoch"]}, position {checkpoint["position"]})'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
