"""Convert a sharded checkpoint directory (TRAIN.SHARDING fsdp) into one .pth file.

    python -m tools.convert_checkpoint output/simmim_pretrain/TAG/ckpt_epoch_799 ckpt_epoch_799.pth
    python -m tools.convert_checkpoint SHARDED_DIR OUT.pth --model-only   # no optimizer state

The file has the keys of the single-file checkpoints (model with the official names, optimizer,
lr_scheduler, epoch, config, position, rng_states, ...), so fine-tuning (--pretrained), --eval,
--resume under DDP and export read it like any other. It runs in one process without a process
group and needs CPU memory for the whole model (and, without --model-only, its AdamW state: three
times as much). Every shard is checked against the checksum its COMPLETE marker records, and
the weights and optimizer state must be finite, before anything is written; the file is written
beside the output and renamed over it, with its checksum record. Exit codes: 0 written, 2 bad
input (a truncated or damaged shard, NaN or infinite values, an output that is a folder, a usage
error), 1 a failed write.
"""

import argparse
import os
import sys

from checkpoint.sharded import read_sharded_checkpoint
from engine.launch import prepare_output_file, run_tool
from utils.atomic_write import atomic_save
from utils.state_dict import check_finite


def _main(argv):
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
    prepare_output_file(args.output, 'The output')
    checkpoint = read_sharded_checkpoint(args.sharded_dir, model_only=args.model_only)
    check_finite(
        {k: checkpoint[k] for k in ('model', 'optimizer') if k in checkpoint},
        f'The sharded checkpoint {args.sharded_dir}',
    )
    atomic_save(checkpoint, args.output, checksum=True)
    values = sum(t.numel() for t in checkpoint['model'].values())
    print(
        f'{args.output}: {len(checkpoint["model"])} tensors, {values:,} values (epoch '
        f'{checkpoint["epoch"]}, position {checkpoint["position"]})'
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 written, 2 bad input (a damaged or incomplete checkpoint, a folder as the
    output), 1 a failed write; failures print one paragraph."""
    return run_tool(_main, argv)


if __name__ == '__main__':
    sys.exit(main())
