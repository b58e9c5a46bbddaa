"""checkpoint/layout.py, checkpoint/resume.py and utils/safe_load.py: atomic writes, verified
auto-resume, safe loading."""

import errno
import logging
import os
import random

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from checkpoint import layout as ckpt
from checkpoint.resume import find_resume_checkpoint
from utils.atomic_write import atomic_save
from utils.errors import CheckpointError, CheckpointWriteError
from utils.safe_load import load_checkpoint_file

LOGGER = logging.getLogger('test')


def _resume_dict(value):
    return {
        'model': {'w': torch.full((2,), float(value))},
        'optimizer': {},
        'lr_scheduler': {},
        'epoch': value,
    }


def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    atomic_save(_resume_dict(1), path)

    def disk_full(obj, f):
        f.write(b'partial bytes')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(CheckpointWriteError) as info:
        atomic_save(_resume_dict(2), path)
    assert 'disk is full' in str(info.value) and 'intact' in str(info.value)
    monkeypatch.undo()
    assert load_checkpoint_file(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['ckpt_epoch_0.pth']  # no temporary file left behind


def test_auto_resume_skips_corrupt_newest_and_says_why(tmp_path, caplog):
    good = str(tmp_path / 'ckpt_epoch_0.pth')
    atomic_save(_resume_dict(0), good)
    truncated = str(tmp_path / 'ckpt_epoch_1.pth')
    atomic_save(_resume_dict(1), truncated)
    with open(truncated, 'r+b') as f:
        f.truncate(200)
    weights_only = str(tmp_path / 'ckpt_epoch_2.pth')
    torch.save({'model': {}}, weights_only)
    os.utime(good, (1, 1))
    os.utime(truncated, (2, 2))
    with caplog.at_level(logging.WARNING, logger='test'):
        path, checkpoint = find_resume_checkpoint(str(tmp_path), LOGGER)
    assert path == good and checkpoint['epoch'] == 0
    messages = caplog.text
    assert 'skipping ' + weights_only in messages and 'lacks optimizer' in messages
    assert 'skipping ' + truncated in messages and 'not a readable PyTorch checkpoint' in messages


def test_auto_resume_picks_the_furthest_position_not_the_newest_file(tmp_path, caplog):
    def save(name, epoch, step):
        path = str(tmp_path / name)
        atomic_save({**_resume_dict(epoch - 1), 'position': {'epoch': epoch, 'step': step}}, path)
        return path

    save('ckpt_epoch_0.pth', 1, 0)
    furthest = save('ckpt_epoch_1_step_4.pth', 1, 4)
    save('ckpt_epoch_0_step_2.pth', 0, 2)
    renamed = save('ckpt_epoch_7.pth', 1, 0)  # a copy under another name: its position disagrees
    os.utime(tmp_path / 'ckpt_epoch_0.pth', (4e9, 4e9))  # touched: the newest by far
    with caplog.at_level(logging.WARNING, logger='test'):
        path, checkpoint = find_resume_checkpoint(str(tmp_path), LOGGER)
    assert path == furthest and checkpoint['position'] == {'epoch': 1, 'step': 4}
    assert (
        f'skipping {renamed}: its name says epoch 8, step 0 but it records epoch 1' in caplog.text
    )


def test_concurrent_saves_to_one_path_all_succeed(tmp_path, monkeypatch):
    """Two writers of one file (two runs in one folder before the lock, or a save racing a
    copy) must not share a temporary name, where one would rename away the other's file."""
    import threading

    real_save, barrier = torch.save, threading.Barrier(2)

    def slow_save(obj, f):
        barrier.wait(timeout=10)  # both temporary files are open before either is renamed
        real_save(obj, f)

    monkeypatch.setattr(torch, 'save', slow_save)
    path, errors = str(tmp_path / 'ckpt_epoch_0.pth'), []

    def write(value):
        try:
            atomic_save(_resume_dict(value), path)
        except Exception as e:  # collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(v,)) for v in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert load_checkpoint_file(path)['epoch'] in (1, 2) and os.listdir(tmp_path) == [
        'ckpt_epoch_0.pth'
    ]


def test_prune_keeps_newest_step_checkpoints_only(tmp_path):
    for epoch, step in [(0, 5), (0, 10), (1, 5), (1, 10)]:
        open(ckpt.step_checkpoint_path(str(tmp_path), epoch, step), 'w').close()
    open(ckpt.epoch_checkpoint_path(str(tmp_path), 0), 'w').close()
    ckpt.prune_step_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        'ckpt_epoch_0.pth',
        'ckpt_epoch_1_step_10.pth',
        'ckpt_epoch_1_step_5.pth',
    ]


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    path = str(tmp_path / 'rng.pth')
    atomic_save({'rng': ckpt.capture_rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.restore_rng_state(load_checkpoint_file(path)['rng'])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_official_checkpoint_with_pickled_cfgnode_loads(tmp_path):
    config = CfgNode(
        {'MODEL': CfgNode({'TYPE': 'swin'}), 'TRAIN': CfgNode({'BETAS': (0.9, 0.999)})}
    )
    path = str(tmp_path / 'official.pth')
    torch.save({'model': {'w': torch.ones(1)}, 'config': config, 'epoch': 99}, path)
    loaded = load_checkpoint_file(path)
    assert loaded['epoch'] == 99 and loaded['config']['MODEL']['TYPE'] == 'swin'


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f'touch {_RunsCode.marker}',))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    _RunsCode.marker = str(tmp_path / 'code_ran')
    path = str(tmp_path / 'evil.pth')
    torch.save({'model': {}, 'payload': _RunsCode()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path, '--pretrained')
    assert 'refused to load' in str(info.value) and 'posix.system' in str(info.value)
    assert not os.path.exists(_RunsCode.marker)


@pytest.mark.parametrize(
    'content, expected',
    [(b'', r'empty \(0 bytes\)'), (b'not a checkpoint at all', 'not a readable')],
)
def test_bad_files_get_clear_errors(tmp_path, content, expected):
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint_file(str(path), '--resume')
    with pytest.raises(CheckpointError, match='file not found'):
        load_checkpoint_file(str(tmp_path / 'missing.pth'), '--resume')


def test_checkpoints_without_a_grad_scaler_hold_a_loadable_scaler_state(tmp_path):
    # The Swin-Transformer repo's loader calls scaler.load_state_dict(checkpoint['scaler']) on
    # resume; a bf16 or fp32 run has no GradScaler, so it stores a fresh one's state, not None.
    config = CfgNode({'A': 1})
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = type('Scheduler', (), {'state_dict': lambda self: {}})()
    checkpoint = ckpt.build_checkpoint(
        config, ckpt.TrainingState(model, optimizer, scheduler), (1, 0), []
    )
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    atomic_save(checkpoint, path)
    saved = load_checkpoint_file(path)['scaler']
    fresh = torch.amp.GradScaler('cpu')
    assert saved == fresh.state_dict() and saved['scale'] == 65536.0
    scaler = torch.amp.GradScaler('cpu', init_scale=8.0)
    scaler.load_state_dict(saved)
    assert scaler.get_scale() == 65536.0
