"""Where a run's scalars and images go, on rank 0: one Tracker fans each record out to

    OUTPUT/metrics.jsonl   always: one JSON line per logged step ('train') and per epoch ('epoch',
                           'val'), flushed at once; a resumed run first drops the lines at or past
                           the step it writes first, so the file never holds a step twice
    TensorBoard            TENSORBOARD: OUTPUT/tensorboard, scalars as '{kind}/{name}'
    Weights & Biases       LOGGING.WANDB: the same scalars and images; the run id is kept in
                           OUTPUT/wandb_run_id, so an auto-resumed run continues the same W&B run

All values sit on one step axis: the global training step `epoch * steps_per_epoch + index`
(per-epoch values at their epoch's last step, engine/train_stats.epoch_end_step).
"""

import json
import logging
import math
import os
import uuid

import numpy as np
import wandb
import yaml

from utils.atomic_write import atomic_write
from utils.errors import ConfigError

METRICS_FILE = 'metrics.jsonl'
WANDB_ID_FILE = 'wandb_run_id'
logger = logging.getLogger('simmim.tracking')


class MetricsFile:
    """OUTPUT/metrics.jsonl, appended one flushed line per record. The first record of this run
    drops the lines of an earlier run at or past its step (what a resume trains again), so each
    (kind, step) appears once and the steps of each kind increase."""

    def __init__(self, path):
        self.path = path
        self._file = None
        self._failed = False

    def write(self, record):
        if self._failed:
            return
        try:
            if self._file is None:
                self._drop_lines_from(record['step'])
                self._file = open(self.path, 'a')
            self._file.write(json.dumps(record, allow_nan=True) + '\n')
            self._file.flush()
        except OSError as e:  # e.g. a full disk: the record is lost, never the training run
            self._failed = True
            logger.warning(
                f'{self.path}: cannot write ({e.strerror or e}); no more lines are written there '
                f'in this run. TensorBoard, W&B and checkpoints go on.'
            )

    def _drop_lines_from(self, step):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)['step'] < step:
                    kept.append(line if line.endswith('\n') else line + '\n')
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a kill: dropped
        if len(kept) != len(lines) or (lines and not lines[-1].endswith('\n')):
            atomic_write(self.path, lambda f: f.write(''.join(kept).encode()))

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path):
    """The records of a metrics.jsonl file (a folder: its metrics.jsonl), in file order; a last
    line cut short by a kill is left out (any other bad line raises ValueError)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith('\n'):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines]


def _wandb_run_id(output):
    """The W&B run id of this run folder: the stored one, or a new one stored now."""
    path = os.path.join(output, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored
    run_id = uuid.uuid4().hex[:12]
    with open(path, 'w') as f:
        f.write(run_id + '\n')
    return run_id


def start_wandb(config):
    """A W&B run for this run folder (resumed when it has one), logging under LOGGING.*; a
    ConfigError saying what to do when W&B cannot start."""
    logging_config = config.LOGGING
    try:
        return wandb.init(
            project=logging_config.WANDB_PROJECT,
            entity=logging_config.WANDB_ENTITY or None,
            name=logging_config.WANDB_NAME or f'{config.MODEL.NAME}/{config.TAG}',
            id=_wandb_run_id(config.OUTPUT),
            resume='allow',
            # WANDB_DIR, when set, decides; else the W&B files stay in the run folder.
            dir=None if os.environ.get('WANDB_DIR') else config.OUTPUT,
            config=yaml.safe_load(config.dump()),
        )
    except (wandb.errors.Error, ValueError) as e:  # ValueError: a bad WANDB_* setting
        raise ConfigError(
            f'LOGGING.WANDB is on, but Weights & Biases could not start: {e}. Log in once '
            f'(`wandb login`, or set WANDB_API_KEY), set WANDB_MODE=offline to keep the run on '
            f'this machine (`wandb sync` uploads it later), or drop --wandb.'
        ) from None


class Tracker:
    """Rank 0's sinks for scalars and images. `tensorboard` is a SummaryWriter or None,
    `wandb_run` a W&B run or None; metrics.jsonl is always written."""

    def __init__(self, output, tensorboard=None, wandb_run=None):
        self.metrics = MetricsFile(os.path.join(output, METRICS_FILE))
        self.tensorboard = tensorboard
        self.wandb_run = wandb_run

    @property
    def logs_images(self):
        return self.tensorboard is not None or self.wandb_run is not None

    def log(self, kind, step, epoch, scalars):
        """One record: `scalars` ({name: number}) of `kind` ('train', 'epoch', 'val') at `step`."""
        scalars = {n: v if isinstance(v, int) else float(v) for n, v in scalars.items()}
        self.metrics.write({'kind': kind, 'step': int(step), 'epoch': int(epoch), **scalars})
        named = {f'{kind}/{name}': value for name, value in scalars.items()}
        if self.tensorboard is not None:
            for name, value in named.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb_run is not None:
            finite = {n: v for n, v in named.items() if math.isfinite(v)}
            self.wandb_run.log({**finite, 'epoch': epoch}, step=int(step))

    def image(self, tag, grid, step):
        """A (3, H, W) uint8 image tensor `grid` at `step` (TensorBoard and W&B)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, grid, step)
        if self.wandb_run is not None:
            pixels = np.ascontiguousarray(grid.permute(1, 2, 0).cpu().numpy())
            self.wandb_run.log({tag: wandb.Image(pixels)}, step=int(step))

    def close(self):
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            wandb.teardown()  # ends W&B's service process and forgets its settings


def build_tracker(config, logger):
    """Rank 0's Tracker: metrics.jsonl, and TensorBoard and W&B when on."""
    tensorboard = wandb_run = None
    if config.TENSORBOARD:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(config.OUTPUT, 'tensorboard')
        tensorboard = SummaryWriter(log_dir=log_dir)
        logger.info(
            f'TensorBoard scalars (and reconstruction images) in {log_dir}: '
            f'tensorboard --logdir {log_dir}'
        )
    if config.LOGGING.WANDB:
        wandb_run = start_wandb(config)
        logger.info(f'Weights & Biases run {wandb_run.id} (project {wandb_run.project})')
    logger.info(f'step and epoch scalars in {os.path.join(config.OUTPUT, METRICS_FILE)}')
    return Tracker(config.OUTPUT, tensorboard, wandb_run)
