"""Draw the training curves of one or several runs from their OUTPUT/metrics.jsonl into one PNG.

    python -m tools.plot_curves output/simmim_pretrain/swin_base [more runs ...] --out curves.png

RUN is a run folder (its metrics.jsonl) or a metrics.jsonl file. Panels: the training loss per
logged step (with the epoch averages as dots), the learning rate, and, when any run has
validation records (fine-tuning), the top-1 accuracy; one colour per run, on the global step
axis of engine/tracking.py. Exit codes: 0 done, 2 bad input (a run without metrics.jsonl, an
empty one, an OUT that is not a .png file).
"""

import argparse
import os
import sys

from matplotlib.figure import Figure  # no pyplot: files only, no display backend

from engine.launch import prepare_output_file, run_tool
from engine.tracking import METRICS_FILE, read_metrics
from utils.errors import ConfigError

DPI = 100


def load_run(path):
    """(label, records) of the run at `path`, or a ConfigError naming what is missing."""
    file = os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(
            f'RUN {path}: no {METRICS_FILE} there. Pass a run folder (OUTPUT/MODEL.NAME/TAG of a '
            f'run of this version) or the metrics.jsonl file itself.'
        )
    try:
        records = read_metrics(file)
    except ValueError as e:
        raise ConfigError(f'RUN {path}: {file} is not JSON lines ({e}).') from None
    if not any(r.get('kind') == 'train' for r in records):
        raise ConfigError(f'RUN {path}: {file} holds no training step yet; train first.')
    folder = os.path.dirname(os.path.abspath(file))
    label = os.path.join(os.path.basename(os.path.dirname(folder)), os.path.basename(folder))
    return label, records


def _series(records, kind, name):
    points = [(r['step'], r[name]) for r in records if r.get('kind') == kind and name in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(runs, out, width, height):
    """Draw `runs` ([(label, records)]) to the PNG `out` of `width` x `height` pixels."""
    with_accuracy = any(r.get('kind') == 'val' for _, records in runs for r in records)
    panels = 3 if with_accuracy else 2
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = figure.subplots(1, panels)
    for index, (label, records) in enumerate(runs):
        colour = f'C{index % 10}'
        axes[0].plot(*_series(records, 'train', 'loss'), color=colour, lw=1, label=label)
        axes[0].plot(*_series(records, 'epoch', 'loss_avg'), 'o', color=colour, ms=3)
        axes[1].plot(*_series(records, 'train', 'lr'), color=colour, lw=1, label=label)
        if with_accuracy:
            axes[2].plot(*_series(records, 'val', 'acc1'), 'o-', color=colour, ms=3, label=label)
    titles = ['training loss (dots: epoch average)', 'learning rate', 'validation top-1 (%)']
    for axis, title in zip(axes, titles, strict=False):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel('step')
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=DPI)


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument('runs', nargs='+', metavar='RUN', help='run folder or metrics.jsonl')
    parser.add_argument('--out', default='curves.png', metavar='FILE.png', help='the PNG')
    parser.add_argument(
        '--size', nargs=2, type=int, default=(1500, 450), metavar=('W', 'H'), help='pixels'
    )
    args = parser.parse_args(argv)
    if min(args.size) < 100:
        raise ConfigError(f'--size {args.size[0]} {args.size[1]}: each side must be >= 100 px.')
    prepare_output_file(args.out, 'OUT', ('.png',))
    runs = [load_run(path) for path in args.runs]
    plot_runs(runs, args.out, *args.size)
    print(f'Wrote {args.out}: {len(runs)} run(s).')
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 bad input; failures print one paragraph."""
    return run_tool(_main, argv)


if __name__ == '__main__':
    sys.exit(main())
