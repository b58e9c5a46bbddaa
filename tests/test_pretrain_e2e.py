"""main_simmim.py end to end on the synthetic dataset: outputs, exact resume, torchrun."""

import glob
import os
import subprocess
import sys

import pytest
import torch

import main_simmim
from engine.launch import run
from tests.conftest import ROOT
from utils.safe_load import load_checkpoint_file

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')


def pretrain(output, *opts, extra=()):
    argv = ['--cfg', TINY, '--output', str(output), *extra]
    code = run(
        main_simmim.main, argv + (['--opts', *map(str, opts)] if opts else []), is_pretrain=True
    )
    return code, os.path.join(str(output), 'simmim_pretrain', 'tiny')


def final_weights(run_dir, epoch=1):
    return load_checkpoint_file(os.path.join(run_dir, f'ckpt_epoch_{epoch}.pth'))['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


def test_pretraining_writes_checkpoint_log_tensorboard_and_reconstructions(tmp_path):
    code, run_dir = pretrain(tmp_path, 'TENSORBOARD', True, 'VIS_FREQ', 1, 'TRAIN.EPOCHS', 1)
    assert code == 0
    checkpoint = load_checkpoint_file(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    assert {
        'model',
        'optimizer',
        'lr_scheduler',
        'scaler',
        'epoch',
        'max_accuracy',
        'config',
    } <= checkpoint.keys()
    assert checkpoint['epoch'] == 0 and checkpoint['position'] == {
        'epoch': 1,
        'step': 0,
        'samples': 0,
    }
    assert 'TYPE: swin' in checkpoint['config']  # YAML text, not a pickled object
    assert any(k.startswith('encoder.') for k in checkpoint['model'])
    log = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert 'Train: [0/1][0/6]' in log and 'grad_norm' in log and 'img/s' in log
    assert os.path.isfile(os.path.join(run_dir, 'config.yaml'))
    assert glob.glob(os.path.join(run_dir, 'tensorboard', 'events.out.tfevents.*'))
    assert os.path.isfile(os.path.join(run_dir, 'reconstructions', 'epoch_0.png'))


def test_resume_after_one_epoch_equals_two_epochs_straight(tmp_path):
    _, straight = pretrain(tmp_path / 'straight', 'DATA.NUM_WORKERS', 2)
    _, split = pretrain(tmp_path / 'split', 'DATA.NUM_WORKERS', 2, 'TRAIN.EPOCHS', 1)
    # Same command with 2 epochs: auto-resume finds ckpt_epoch_0.pth and continues.
    code, split = pretrain(tmp_path / 'split', 'DATA.NUM_WORKERS', 2)
    assert code == 0
    assert 'resumed from' in open(os.path.join(split, 'log_rank0.txt')).read()
    assert_same_weights(final_weights(straight), final_weights(split))


def test_mid_epoch_step_checkpoint_resumes_with_the_next_batch(tmp_path):
    _, straight = pretrain(tmp_path / 'straight')
    _, split = pretrain(
        tmp_path / 'split', 'CHECKPOINT.STEP_FREQ', 4, 'CHECKPOINT.KEEP_STEP_CKPTS', 2
    )
    names = sorted(os.listdir(split))
    # 6 steps per epoch: updates 4, 8, 12 land at epoch 0 step 4, epoch 1 steps 2 and 6; the two
    # newest are kept.
    assert 'ckpt_epoch_1_step_2.pth' in names and 'ckpt_epoch_1_step_6.pth' in names
    assert 'ckpt_epoch_0_step_4.pth' not in names
    # Throw away everything after epoch 1 step 2 and resume from there.
    for name in ('ckpt_epoch_1.pth', 'ckpt_epoch_1_step_6.pth'):
        os.remove(os.path.join(split, name))
    code, split = pretrain(tmp_path / 'split')
    assert code == 0
    log = open(os.path.join(split, 'log_rank0.txt')).read()
    assert 'continuing at epoch 1, step 2' in log
    assert_same_weights(final_weights(straight), final_weights(split))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    cmd = [
        torchrun,
        '--nproc_per_node',
        '2',
        '--standalone',
        os.path.join(ROOT, 'main_simmim.py'),
        '--cfg',
        TINY,
        '--output',
        str(tmp_path),
        '--opts',
        'TRAIN.EPOCHS',
        '1',
        'DATA.BATCH_SIZE',
        '4',
    ]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = os.path.join(str(tmp_path), 'simmim_pretrain', 'tiny')
    log1 = open(os.path.join(run_dir, 'log_rank1.txt')).read()
    assert 'RANK 1 WORLD_SIZE 2' in log1
    log0 = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert 'Train: [0/1][0/6]' in log0  # 48 images / 2 ranks / batch 4 = 6 steps per rank
    assert os.path.isfile(os.path.join(run_dir, 'ckpt_epoch_0.pth'))


def test_gradient_accumulation_matches_one_larger_batch(tmp_path):
    """2 micro-batches of 8 then one step = one batch of 16 (constant LR, no drop path: the same
    samples in the same order, and SimMIM's loss is normalised per micro-batch by an equal
    count)."""
    constant = [
        'TRAIN.EPOCHS',
        1,
        'TRAIN.WARMUP_EPOCHS',
        0,
        'TRAIN.LR_SCHEDULER.NAME',
        'multistep',
        'MODEL.DROP_PATH_RATE',
        0.0,
    ]
    _, accumulated = pretrain(
        tmp_path / 'acc', *constant, extra=['--batch-size', '8', '--accumulation-steps', '2']
    )
    _, large = pretrain(tmp_path / 'large', *constant, extra=['--batch-size', '16'])
    _, small = pretrain(tmp_path / 'small', *constant, extra=['--batch-size', '8'])
    a, b, c = (final_weights(d, epoch=0) for d in (accumulated, large, small))

    def largest_difference(x, y):
        return max((x[k] - y[k]).abs().max().item() for k in x)

    assert largest_difference(a, b) < 1e-5
    assert largest_difference(c, b) > 1e-4  # without accumulation the result really differs
