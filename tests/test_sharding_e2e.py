"""TRAIN.SHARDING fsdp end to end on two gloo processes: the same training as DDP, sharded
checkpoints that resume on two processes and on one, preemption and keep-K in the sharded layout,
and the converted single file fine-tuning.

Every run is the tiny SwinV2 of tests/configs with gradient accumulation and a clip threshold small
enough to clip (so the global gradient norm over shards matters); the FSDP run also checkpoints
activations, and rank 0 alone gets a NaN loss once, which every rank must skip.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import main_finetune
import main_simmim
from checkpoint.sharded import read_sharded_checkpoint
from engine import batch_loss as tasks
from engine.launch import run
from models.dvae import DiscreteVAE, save_tokenizer
from tests.conftest import ROOT
from tools import convert_checkpoint
from utils.errors import EXIT_PREEMPTED
from utils.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

TINY_V2 = os.path.join(ROOT, 'tests', 'configs', 'tiny_swinv2_pretrain.yaml')
COMMON = ['TRAIN.ACCUMULATION_STEPS', '2']
FSDP = ['TRAIN.SHARDING', 'fsdp', 'TRAIN.USE_CHECKPOINT', 'True']
STEP_CHECKPOINTS = ['CHECKPOINT.STEP_FREQ', '2', 'CHECKPOINT.KEEP_STEP_CKPTS', '2']
NAN_ON_RANK0_AT_CALL = 3  # epoch 0, first micro-step of the second update

# Runs main_simmim as the command line does, after making rank 0's loss NaN once.
NAN_WRAPPER = r"""
import os, sys
sys.path.insert(0, {root!r})
import main_simmim
from engine import batch_loss as tasks
from engine.launch import run
calls = [0]
task = tasks.PretrainBatchLoss.__call__

def nan_once_on_rank0(self, model, batch, device):
    calls[0] += 1
    loss, batch_size = task(self, model, batch, device)
    if os.environ['RANK'] == '0' and calls[0] == {call}:
        loss = loss * float('nan')
    return loss, batch_size

tasks.PretrainBatchLoss.__call__ = nan_once_on_rank0
sys.exit(run(main_simmim.main, sys.argv[1:]))
"""


def torchrun(tmp_path, out, *opts, nan=False):
    script = os.path.join(ROOT, 'main_simmim.py')
    if nan:
        script = str(tmp_path / 'nan_main.py')
        with open(script, 'w') as f:
            f.write(NAN_WRAPPER.format(root=ROOT, call=NAN_ON_RANK0_AT_CALL))
    command = [
        os.path.join(os.path.dirname(sys.executable), 'torchrun'),
        '--nproc_per_node',
        '2',
        '--standalone',  # a free port of its own: tests running at once never collide
        script,
        '--cfg',
        TINY_V2,
        '--output',
        str(out),
        '--opts',
        *COMMON,
        *opts,
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return os.path.join(str(out), 'simmim_pretrain', 'tiny_v2')


def progress_lines(run_dir):
    """(loss, grad_norm, skipped) of every logged step of rank 0 (PRINT_FREQ 1)."""
    lines = open(os.path.join(run_dir, 'log_rank0.txt')).read().splitlines()
    return [
        (
            line.split('\tloss ')[1].split()[0],
            line.split('grad_norm ')[1].split()[0],
            'skipped' in line,
        )
        for line in lines
        if 'Train: [' in line
    ]


def model_weights(path):
    """The model state dict of a checkpoint of either layout."""
    if os.path.isdir(path):
        return read_sharded_checkpoint(path, model_only=True)['model']
    return load_checkpoint_file(path)['model']


def max_difference(a, b):
    """The largest absolute difference over all tensors; NaN when any tensor holds one (a max
    of Python floats would pass over it: max([0.0, nan]) == 0.0)."""
    assert a.keys() == b.keys()
    return torch.stack([(a[k].double() - b[k].double()).abs().max() for k in a]).max().item()


@pytest.fixture(scope='module')
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fsdp')
    return torchrun(tmp, tmp / 'out', *FSDP, *STEP_CHECKPOINTS, nan=True)


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    return torchrun(tmp, tmp / 'out', nan=True)


def test_fsdp_gives_the_loss_curve_and_weights_of_ddp(fsdp_run, ddp_run):
    fsdp, ddp = progress_lines(fsdp_run), progress_lines(ddp_run)
    assert len(fsdp) == 12 and fsdp == ddp  # loss, clipped global grad norm, the skipped NaN step
    assert [skipped for *_, skipped in fsdp].count(True) > 0
    assert (
        'FSDP: 5 block units + root over 2 ranks'
        in open(os.path.join(fsdp_run, 'log_rank0.txt')).read()
    )
    difference = max_difference(
        model_weights(os.path.join(fsdp_run, 'ckpt_epoch_1')),
        model_weights(os.path.join(ddp_run, 'ckpt_epoch_1.pth')),
    )
    assert difference < 1e-6


def test_compiled_blocks_under_fsdp_give_the_eager_run(fsdp_run, tmp_path):
    # Each block is compiled before fully_shard wraps it (engine/sharding.py); aot_eager traces the
    # same graphs as inductor without its kernels, so the run must match the eager one exactly.
    compiled = torchrun(
        tmp_path,
        tmp_path / 'out',
        *FSDP,
        'TRAIN.COMPILE',
        'blocks',
        'TRAIN.COMPILE_BACKEND',
        'aot_eager',
        nan=True,
    )
    assert progress_lines(compiled) == progress_lines(fsdp_run)
    log = open(os.path.join(compiled, 'log_rank0.txt')).read()
    assert 'TRAIN.COMPILE blocks: 5 transformer blocks compiled' in log
    assert (
        max_difference(
            model_weights(os.path.join(compiled, 'ckpt_epoch_1')),
            model_weights(os.path.join(fsdp_run, 'ckpt_epoch_1')),
        )
        < 1e-6
    )


def test_sharded_layout_with_keep_k(fsdp_run):
    names = sorted(os.listdir(fsdp_run))
    # Updates 2, 4, 6 wrote step checkpoints; keep-K 2 left the newest two.
    assert [n for n in names if n.startswith('ckpt_')] == [
        'ckpt_epoch_0',
        'ckpt_epoch_1',
        'ckpt_epoch_1_step_2',
        'ckpt_epoch_1_step_6',
    ]
    shards = sorted(os.listdir(os.path.join(fsdp_run, 'ckpt_epoch_1')))
    assert shards == ['.metadata', 'COMPLETE', '__0_0.distcp', '__1_0.distcp', 'progress.pth']


def test_resume_on_two_processes_is_exact(fsdp_run, tmp_path):
    out = tmp_path / 'out'
    resumed = os.path.join(str(out), 'simmim_pretrain', 'tiny_v2')
    shutil.copytree(os.path.join(fsdp_run, 'ckpt_epoch_0'), os.path.join(resumed, 'ckpt_epoch_0'))
    torchrun(tmp_path, out, *FSDP)
    assert 'resumed from' in open(os.path.join(resumed, 'log_rank0.txt')).read()
    final, alone = (model_weights(os.path.join(d, 'ckpt_epoch_1')) for d in (resumed, fsdp_run))
    assert max_difference(final, alone) == 0


def test_resume_on_one_process_with_a_preemption_on_the_way(fsdp_run, tmp_path, monkeypatch):
    """Two ranks of 4 images wrote the checkpoint; one process of 8 continues (the same images
    per step), is preempted mid-epoch, resumes from its sharded step checkpoint and ends where the
    two-process run left alone ended."""
    resumed = os.path.join(str(tmp_path), 'simmim_pretrain', 'tiny_v2')
    shutil.copytree(os.path.join(fsdp_run, 'ckpt_epoch_0'), os.path.join(resumed, 'ckpt_epoch_0'))
    argv = [
        '--cfg',
        TINY_V2,
        '--output',
        str(tmp_path),
        '--opts',
        *COMMON,
        *FSDP,
        'DATA.BATCH_SIZE',
        '8',
    ]
    task, calls = tasks.PretrainBatchLoss.__call__, [0]

    def sigterm_at_the_third_batch(self, model, batch, device):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return task(self, model, batch, device)

    monkeypatch.setattr(tasks.PretrainBatchLoss, '__call__', sigterm_at_the_third_batch)
    assert run(main_simmim.main, argv) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(resumed, 'ckpt_epoch_1_step_4', 'COMPLETE'))
    assert not any(name.endswith('.tmp') for name in os.listdir(resumed))
    assert run(main_simmim.main, argv) == 0
    log = open(os.path.join(resumed, 'log_rank0.txt')).read()
    assert 'written by 2 processes and this run has 1' in log
    assert f'resumed from {os.path.join(resumed, "ckpt_epoch_1_step_4")}' in log
    final, alone = (model_weights(os.path.join(d, 'ckpt_epoch_1')) for d in (resumed, fsdp_run))
    assert max_difference(final, alone) < 1e-6


def test_converted_checkpoint_fine_tunes(fsdp_run, tmp_path):
    converted = str(tmp_path / 'pretrained.pth')
    assert convert_checkpoint.main([os.path.join(fsdp_run, 'ckpt_epoch_1'), converted]) == 0
    code = run(
        main_finetune.main,
        [
            '--cfg',
            TINY_V2,
            '--output',
            str(tmp_path),
            '--pretrained',
            converted,
            '--opts',
            'TRAIN.EPOCHS',
            '1',
            'DATA.SYNTHETIC.TRAIN_SIZE',
            '16',
        ],
        is_pretrain=False,
    )
    assert code == 0
    log = open(os.path.join(str(tmp_path), 'simmim_pretrain', 'tiny_v2', 'log_rank0.txt')).read()
    assert 'Newly initialised (not in checkpoint): head.*' in log
    assert 'Accuracy of the network on the 24 test images' in log


@pytest.fixture(scope='module')
def token_runs(tmp_path_factory):
    """The dVAE-token target (a frozen tokenizer outside the model) on two ranks: DDP, and FSDP
    with compiled blocks (aot_eager), from one tokenizer file."""
    tmp = tmp_path_factory.mktemp('tokens')
    tokenizer = str(tmp / 'tok.safetensors')
    torch.manual_seed(0)
    save_tokenizer(DiscreteVAE(vocab_size=32, hidden_dim=8, num_groups=2), tokenizer)
    tokens = [
        'MODEL.SIMMIM.TARGET.NAME',
        'dvae_tokens',
        'MODEL.SIMMIM.TARGET.TOKENIZER',
        tokenizer,
        'MODEL.SIMMIM.TARGET.VOCAB_SIZE',
        '32',
        'MODEL.SIMMIM.TARGET.DOWNSAMPLE',
        '16',
    ]
    ddp = torchrun(tmp / 'ddp', tmp / 'ddp' / 'out', *tokens)
    compiled = ['TRAIN.COMPILE', 'blocks', 'TRAIN.COMPILE_BACKEND', 'aot_eager']
    fsdp = torchrun(tmp / 'fsdp', tmp / 'fsdp' / 'out', *tokens, *FSDP, *compiled)
    return ddp, fsdp


def test_the_token_target_trains_the_same_under_ddp_and_compiled_fsdp(token_runs):
    ddp, fsdp = token_runs
    curve = progress_lines(ddp)
    assert len(curve) == 12 and curve == progress_lines(fsdp)
    final = model_weights(os.path.join(ddp, 'ckpt_epoch_1.pth'))
    assert not any('tokenizer' in k for k in final)
    assert max_difference(final, model_weights(os.path.join(fsdp, 'ckpt_epoch_1'))) < 1e-6
