"""Does SimMIM pre-training help? A CPU-sized check on the built-in synthetic dataset.

1. Pre-train the quickstart Swin with SimMIM (main_simmim.py).
2. Fine-tune it (main_finetune.py --pretrained ...).
3. Fine-tune the same architecture from random initialisation with the same recipe.

Reports both top-1 accuracies and the wall times, and appends them to benchmarks/RESULTS.md with
the machine they ran on. Not a test: it takes minutes.

    python -m benchmarks.pretrain_vs_scratch [--pretrain-epochs 16] [--finetune-epochs 15]
"""

import argparse
import datetime
import os
import time

import torch

import main_finetune
import main_simmim
from benchmarks.report import machine_description
from engine.launch import run
from utils.safe_load import load_checkpoint_file
from utils.tasks import FINETUNE, PRETRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRETRAIN_CFG = 'configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml'
FINETUNE_CFG = 'configs/quickstart/simmim_finetune__swin_tiny__img64__synthetic.yaml'


def timed(main_fn, argv, task):
    start = time.time()
    code = run(main_fn, argv, task)
    if code != 0:
        raise SystemExit(f'{" ".join(argv)} failed with exit code {code}')
    return time.time() - start


def best_accuracy(output, tag):
    path = os.path.join(output, 'simmim_finetune', tag, 'model_best.pth')
    return load_checkpoint_file(path)['accuracy']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pretrain-epochs', type=int, default=16)
    parser.add_argument('--finetune-epochs', type=int, default=15)
    parser.add_argument('--output', default=os.path.join(ROOT, 'output', 'benchmark'))
    parser.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'RESULTS.md'))
    args = parser.parse_args()
    os.chdir(ROOT)

    pretrain_out = os.path.join(args.output, 'pretrain')
    pretrain_time = timed(
        main_simmim.main,
        [
            '--cfg',
            PRETRAIN_CFG,
            '--output',
            pretrain_out,
            '--opts',
            'TRAIN.EPOCHS',
            str(args.pretrain_epochs),
            'SAVE_FREQ',
            str(args.pretrain_epochs),
            'VIS_FREQ',
            '0',
        ],
        PRETRAIN,
    )
    checkpoint = os.path.join(
        pretrain_out,
        'simmim_pretrain',
        'simmim_pretrain__swin_tiny__img64__synthetic',
        f'ckpt_epoch_{args.pretrain_epochs - 1}.pth',
    )

    results = {}
    for name, extra in (('SimMIM pre-trained', ['--pretrained', checkpoint]), ('random init', [])):
        output = os.path.join(args.output, name.split()[0].lower())
        seconds = timed(
            main_finetune.main,
            [
                '--cfg',
                FINETUNE_CFG,
                '--output',
                output,
                *extra,
                '--opts',
                'TRAIN.EPOCHS',
                str(args.finetune_epochs),
            ],
            FINETUNE,
        )
        results[name] = (
            best_accuracy(output, 'simmim_finetune__swin_tiny__img64__synthetic'),
            seconds,
        )

    lines = [
        f'\n## Pre-training vs. random initialisation ({datetime.date.today()})\n',
        f'Machine: {machine_description("cuda" if torch.cuda.is_available() else "cpu")} '
        f'({torch.get_num_threads()} torch threads).\n',
        f'`python -m benchmarks.pretrain_vs_scratch --pretrain-epochs {args.pretrain_epochs} '
        f'--finetune-epochs {args.finetune_epochs}`: SimMIM pre-training of `{PRETRAIN_CFG}` '
        f'took {pretrain_time / 60:.1f} min; then `{FINETUNE_CFG}` on the synthetic set '
        f'(8 classes, best top-1 on its validation split):\n',
        '| start | top-1 (%) | fine-tune wall time (min) |',
        '|---|---|---|',
        *[f'| {name} | {acc:.2f} | {sec / 60:.1f} |' for name, (acc, sec) in results.items()],
        '',
    ]
    text = '\n'.join(lines)
    print(text)
    with open(args.results, 'a') as f:
        f.write(text)


if __name__ == '__main__':
    main()
