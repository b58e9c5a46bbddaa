"""engine/tracking.py: OUTPUT/metrics.jsonl across resumes, W&B in offline mode (nothing leaves
the machine), and tools/plot_curves.py drawing runs from their metrics.jsonl."""

import errno
import glob
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from wandb.proto import wandb_internal_pb2

from engine.tracking import METRICS_FILE, WANDB_ID_FILE, MetricsFile, read_metrics
from tests.test_pretrain_e2e import pretrain
from tools import plot_curves

STEPS_PER_EPOCH = 6  # tests/configs/tiny_swin_pretrain.yaml


def train_records(run_dir):
    return [r for r in read_metrics(run_dir) if r['kind'] == 'train']


def test_a_run_continued_to_two_epochs_logs_every_step_once(tmp_path):
    code, run_dir = pretrain(tmp_path, 'PRINT_FREQ', 1, 'TRAIN.EPOCHS', 1)
    assert code == 0
    first = train_records(run_dir)
    assert [r['step'] for r in first] == list(range(STEPS_PER_EPOCH))
    code, run_dir = pretrain(tmp_path, 'PRINT_FREQ', 1, 'TRAIN.EPOCHS', 2)
    assert code == 0
    records = read_metrics(run_dir)
    train = [r for r in records if r['kind'] == 'train']
    assert [r['step'] for r in train] == list(range(2 * STEPS_PER_EPOCH))
    assert [r['epoch'] for r in train] == [0] * 6 + [1] * 6
    assert train[:6] == first  # the first run's lines are kept as they were
    assert [r['update'] for r in train] == list(range(1, 13))  # one optimizer update per step
    assert all({'loss', 'lr', 'grad_norm', 'images_per_sec'} <= r.keys() for r in train)
    epochs = [(r['step'], r['epoch']) for r in records if r['kind'] == 'epoch']
    assert epochs == [(5, 0), (11, 1)]
    # The log line prints the same loss the file holds.
    log = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert f'loss {train[-1]["loss"]:.4f}' in log.split('Train: [1/2][5/6]')[1].splitlines()[0]


def test_a_resume_from_a_step_checkpoint_drops_the_lines_it_trains_again(tmp_path):
    opts = ('PRINT_FREQ', 1, 'CHECKPOINT.STEP_FREQ', 4, 'CHECKPOINT.KEEP_STEP_CKPTS', 2)
    code, run_dir = pretrain(tmp_path, *opts)
    assert code == 0
    before = train_records(run_dir)
    # As if the run had been stopped after epoch 1 step 2's checkpoint but after logging steps
    # 8-11 (a SIGTERM arriving late): the resume trains steps 8-11 again.
    for name in ('ckpt_epoch_1.pth', 'ckpt_epoch_1_step_6.pth'):
        os.remove(os.path.join(run_dir, name))
    code, run_dir = pretrain(tmp_path, *opts)
    assert code == 0
    records = read_metrics(run_dir)
    steps = [r['step'] for r in records if r['kind'] == 'train']
    assert steps == list(range(12))  # no step twice, increasing
    assert [(r['step'], r['kind']) for r in records if r['kind'] != 'train'] == [
        (5, 'epoch'),
        (11, 'epoch'),
    ]
    after = train_records(run_dir)
    assert [r['loss'] for r in after] == pytest.approx([r['loss'] for r in before], abs=1e-6)


def test_metrics_file_drops_a_line_cut_short_and_lines_past_the_first_new_step(tmp_path):
    path = tmp_path / METRICS_FILE
    lines = [json.dumps({'kind': 'train', 'step': s, 'epoch': 0, 'loss': s}) for s in range(5)]
    path.write_text('\n'.join(lines) + '\n{"kind": "train", "st')  # killed mid-write
    assert [r['step'] for r in read_metrics(str(path))] == [0, 1, 2, 3, 4]  # what a plot reads
    metrics = MetricsFile(str(path))
    metrics.write({'kind': 'train', 'step': 3, 'epoch': 0, 'loss': 30.0})
    metrics.close()
    assert [(r['step'], r['loss']) for r in read_metrics(str(path))] == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 30.0),
    ]


def test_a_metrics_file_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, caplog):
    metrics = MetricsFile(str(tmp_path / METRICS_FILE))
    metrics.write({'kind': 'train', 'step': 0, 'epoch': 0})

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, 'No space left on device')

    metrics._file = FullDisk()
    with caplog.at_level(logging.WARNING, logger='simmim.tracking'):
        for step in (1, 2):
            metrics.write({'kind': 'train', 'step': step, 'epoch': 0})  # raises nothing
    assert [r.getMessage().count('No space left on device') for r in caplog.records] == [1]
    assert [r['step'] for r in read_metrics(str(tmp_path))] == [0]


# ------------------------------------------------------------------------------------------------
# Weights & Biases, offline
# ------------------------------------------------------------------------------------------------
def wandb_records(path):
    """The protobuf records of a W&B transaction log (run-ID.wandb): a 7-byte file header, then
    LevelDB-log blocks of 32 KiB whose chunks have a 7-byte header (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last; 0 padding to the block's end)."""
    data = open(path, 'rb').read()
    position, block, partial = 7, 32768, b''
    while position + 7 <= len(data):
        left = block - position % block
        kind = data[position + 6] if left >= 7 else 0
        if kind == 0:
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], 'little')
        partial += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            yield record
            partial = b''


def wandb_run(folder):
    """(run id, [{key: value} of each history row]) of one offline run folder."""
    (log,) = glob.glob(os.path.join(folder, 'run-*.wandb'))
    run_id, rows = None, []
    for record in wandb_records(log):
        kind = record.WhichOneof('record_type')
        if kind == 'run':
            run_id = record.run.run_id
        elif kind == 'history':
            rows.append(
                {
                    item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return run_id, rows


def test_wandb_offline_logs_the_scalars_and_images_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb_dir'))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    (tmp_path / 'wandb_dir').mkdir()
    opts = ('PRINT_FREQ', 1, 'VIS_FREQ', 1, 'TENSORBOARD', False)
    code, run_dir = pretrain(tmp_path / 'out', *opts, 'TRAIN.EPOCHS', 1, extra=['--wandb'])
    assert code == 0
    stored_id = open(os.path.join(run_dir, WANDB_ID_FILE)).read().strip()
    code, run_dir = pretrain(tmp_path / 'out', *opts, 'TRAIN.EPOCHS', 2, extra=['--wandb'])
    assert code == 0
    folders = sorted(glob.glob(str(tmp_path / 'wandb_dir' / 'wandb' / 'offline-run-*')))
    assert len(folders) == 2
    runs = [wandb_run(folder) for folder in folders]
    assert [run_id for run_id, _ in runs] == [stored_id, stored_id]  # the same W&B run resumed
    losses = {
        row['_step']: row['train/loss'] for _, rows in runs for row in rows if 'train/loss' in row
    }
    expected = {r['step']: r['loss'] for r in train_records(run_dir)}
    assert sorted(losses) == list(range(12))
    assert losses == pytest.approx(expected, rel=1e-6)
    images = [row['_step'] for _, rows in runs for row in rows if row.get('reconstruction/_type')]
    assert images == [5, 11]  # each at its epoch's last step, as in TensorBoard
    for folder, step in zip(folders, images, strict=True):
        assert glob.glob(os.path.join(folder, 'files', 'media', 'images', f'*_{step}_*.png'))


def test_wandb_that_cannot_start_is_one_paragraph_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('WANDB_MODE', 'sideways')  # not a mode: W&B refuses to start
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    code, _ = pretrain(tmp_path / 'out', 'TRAIN.EPOCHS', 1, extra=['--wandb'])
    assert code == 2
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert 'LOGGING.WANDB is on, but Weights & Biases could not start' in out
    assert 'WANDB_MODE=offline' in out and 'Traceback' not in out


# ------------------------------------------------------------------------------------------------
# tools/plot_curves.py
# ------------------------------------------------------------------------------------------------
def write_run(folder, scale, with_val):
    folder.mkdir(parents=True)
    metrics = MetricsFile(str(folder / METRICS_FILE))
    for step in range(8):
        metrics.write(
            {'kind': 'train', 'step': step, 'epoch': step // 4, 'loss': scale / (step + 1)}
            | {'lr': 1e-3 * step}
        )
        if step % 4 == 3:
            metrics.write({'kind': 'epoch', 'step': step, 'epoch': step // 4, 'loss_avg': scale})
            if with_val:
                metrics.write({'kind': 'val', 'step': step, 'epoch': step // 4, 'acc1': step})
    metrics.close()
    return str(folder)


def test_plot_curves_draws_two_runs_to_a_png_of_the_asked_size(tmp_path, capsys):
    first = write_run(tmp_path / 'a' / 'run1', 1.0, with_val=True)
    second = write_run(tmp_path / 'b' / 'run2', 2.0, with_val=False)
    out = tmp_path / 'plots' / 'curves.png'
    code = plot_curves.main([first, os.path.join(second, METRICS_FILE), '--out', str(out)])
    assert code == 0 and 'Wrote' in capsys.readouterr().out
    image = Image.open(out)
    assert image.size == (1500, 450)
    colours = np.unique(np.asarray(image.convert('RGB')).reshape(-1, 3), axis=0)
    assert len(colours) > 10  # drawn, not blank
    assert plot_curves.main([first, '--out', str(out), '--size', '800', '300']) == 0
    assert Image.open(out).size == (800, 300)


def test_plot_curves_refuses_a_folder_without_metrics(tmp_path, capsys):
    code = plot_curves.main([str(tmp_path), '--out', str(tmp_path / 'c.png')])
    assert code == 2
    assert 'no metrics.jsonl there' in capsys.readouterr().err
    assert not (tmp_path / 'c.png').exists()


def test_dropping_the_lines_of_an_earlier_run_writes_the_file_atomically(tmp_path, fsynced):
    path = tmp_path / METRICS_FILE
    path.write_text(''.join(json.dumps({'kind': 'train', 'step': s}) + '\n' for s in range(3)))
    metrics = MetricsFile(str(path))
    metrics.write({'kind': 'train', 'step': 1})
    metrics.close()
    assert [r['step'] for r in read_metrics(str(path))] == [0, 1]
    assert any(p.startswith(f'{path}.') and p.endswith('.tmp') for p in fsynced)  # then renamed
    assert str(tmp_path) in fsynced and os.listdir(tmp_path) == [METRICS_FILE]
