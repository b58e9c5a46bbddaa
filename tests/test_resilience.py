"""Fault injection on real training processes: SIGKILL, a kill while writing a checkpoint, SIGTERM,
non-finite losses and a full disk. Each fault is injected by a small wrapper script that patches
one function and then runs main_simmim exactly as the command line does."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_simmim
from data.synthetic import SyntheticShapes
from engine.launch import run
from engine.tracking import read_metrics
from tests.conftest import ROOT
from tools.make_shards import convert
from utils.errors import EXIT_PREEMPTED
from utils.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')

WRAPPER = r"""
import errno, os, sys, time
sys.path.insert(0, {root!r})
import torch
import main_simmim
from engine import batch_loss as tasks
from engine.launch import run

fault, _, arg = os.environ.get('FAULT', '').partition(':')
calls = [0]
task = tasks.PretrainBatchLoss.__call__

def faulty_task(self, model, batch, device):
    calls[0] += 1
    loss, batch_size = task(self, model, batch, device)
    if fault == 'slow':
        time.sleep(float(arg))
    if fault == 'nan' and calls[0] in {{int(s) for s in arg.split(',')}}:
        loss = loss * float('nan')
    return loss, batch_size

tasks.PretrainBatchLoss.__call__ = faulty_task
saves = [0]
real_save = torch.save

def faulty_save(obj, f, *args, **kwargs):
    saves[0] += 1
    if fault in ('kill_in_save', 'disk_full') and saves[0] == int(arg):
        f.write(b'the first bytes of a checkpoint')
        f.flush()
        if fault == 'kill_in_save':
            os.kill(os.getpid(), 9)
        if fault == 'disk_full':
            raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(obj, f, *args, **kwargs)

torch.save = faulty_save
sys.exit(run(main_simmim.main, sys.argv[1:]))
"""


def command(tmp_path, *opts):
    script = tmp_path / 'faulty_main.py'
    script.write_text(WRAPPER.format(root=ROOT))
    return [
        sys.executable,
        str(script),
        '--cfg',
        TINY,
        '--output',
        str(tmp_path / 'out'),
        *(['--opts', *map(str, opts)] if opts else []),
    ]


def run_dir(tmp_path):
    return os.path.join(str(tmp_path / 'out'), 'simmim_pretrain', 'tiny')


def launch(tmp_path, fault='', *opts, wait=True):
    env = {**os.environ, 'FAULT': fault, 'PYTHONUNBUFFERED': '1'}
    # Its own session (process group), as a job under a shell or scheduler has.
    proc = subprocess.Popen(
        command(tmp_path, *opts),
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if wait:
        out, _ = proc.communicate(timeout=240)
        return proc.returncode, out
    return proc


def wait_for(proc, path, text, count=1, timeout=120):
    """Wait until `text` appears `count` times in the file at `path` (the training log)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and open(path).read().count(text) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(
        f'{text!r} never appeared in {path}; output: {proc.communicate()[0][-2000:]}'
    )


@pytest.fixture(scope='module')
def reference_weights(tmp_path_factory):
    """Final weights of the uninterrupted 2-epoch run (in-process, same code path)."""
    out = tmp_path_factory.mktemp('reference')
    assert run(main_simmim.main, ['--cfg', TINY, '--output', str(out)]) == 0
    path = os.path.join(str(out), 'simmim_pretrain', 'tiny', 'ckpt_epoch_1.pth')
    return load_checkpoint_file(path)['model']


def assert_same_tree(a, b):
    """Equal nested dicts / lists of tensors and plain values, bit for bit (NaN never equal)."""
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    else:
        assert a == b


def assert_same_weights(a, b, context=''):
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f'{context} differ: {different[:3]}'


def assert_each_logged_step_once(run_folder):
    """metrics.jsonl after interruptions and resumes: every step the tiny run logs (PRINT_FREQ 2
    and each epoch's last of 6 steps) exactly once, in order."""
    steps = [r['step'] for r in read_metrics(run_folder) if r['kind'] == 'train']
    assert steps == [e * 6 + i for e in (0, 1) for i in range(6) if i % 2 == 0 or i == 5]


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tmp_path, reference_weights):
    # Any of the 12 steps but the last; the seed is printed on failure and can be replayed with
    # SIMMIM_TEST_SEED=N.
    seed = int(os.environ.get('SIMMIM_TEST_SEED', random.randrange(2**31)))
    kill_after = random.Random(seed).randint(1, 10)
    where = f'killed after checkpoint {kill_after} (SIMMIM_TEST_SEED={seed})'
    proc = launch(tmp_path, 'slow:0.1', 'CHECKPOINT.STEP_FREQ', 1, wait=False)
    wait_for(proc, os.path.join(run_dir(tmp_path), 'log_rank0.txt'), '.pth saved', count=kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    code, out = launch(tmp_path, '', 'CHECKPOINT.STEP_FREQ', 1)
    assert code == 0, f'{where}: {out[-2000:]}'
    assert 'resumed from' in out, where
    final = load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_1.pth'))['model']
    assert_same_weights(reference_weights, final, where)
    assert_each_logged_step_once(run_dir(tmp_path))


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference_weights):
    # Saves: 1 = epoch-0 checkpoint, 2 = the epoch-1 one, killed half-way through its write.
    code, out = launch(tmp_path, 'kill_in_save:2')
    assert code == -signal.SIGKILL
    names = os.listdir(run_dir(tmp_path))
    assert any(n.startswith('ckpt_epoch_1.pth.') and n.endswith('.tmp') for n in names)
    assert 'ckpt_epoch_1.pth' not in names
    assert load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_0.pth'))['epoch'] == 0
    code, out = launch(tmp_path)
    assert code == 0, out[-2000:]
    assert 'ckpt_epoch_0.pth: continuing at epoch 1, step 0' in out
    final = load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_1.pth'))['model']
    assert_same_weights(reference_weights, final)


def test_sigterm_writes_a_checkpoint_and_exits_with_the_requeue_code(tmp_path, reference_weights):
    proc = launch(tmp_path, 'slow:0.1', wait=False)
    wait_for(proc, os.path.join(run_dir(tmp_path), 'log_rank0.txt'), 'Train: [0/2][2/6]')
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    assert 'Preempted: Stopped by SIGTERM after step' in out
    assert 'Traceback' not in out
    step_files = [n for n in os.listdir(run_dir(tmp_path)) if '_step_' in n and n.endswith('.pth')]
    assert len(step_files) == 1
    code, out = launch(tmp_path)
    assert code == 0 and f'resumed from {os.path.join(run_dir(tmp_path), step_files[0])}' in out
    final = load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_1.pth'))['model']
    assert_same_weights(reference_weights, final)
    assert_each_logged_step_once(run_dir(tmp_path))


def test_a_restart_right_after_sigkill_of_the_main_process_resumes(tmp_path, reference_weights):
    """SIGKILL of the main process alone orphans its DataLoader workers, which live on until they
    notice; the folder lock is the main process's own, so the same command started at once takes
    the folder and resumes (a lock the workers shared would refuse it with exit 2)."""
    opts = ('CHECKPOINT.STEP_FREQ', 1, 'DATA.NUM_WORKERS', 2, 'DATA.PERSISTENT_WORKERS', True)
    proc = launch(tmp_path, 'slow:0.1', *opts, wait=False)
    wait_for(proc, os.path.join(run_dir(tmp_path), 'log_rank0.txt'), '.pth saved', count=3)
    proc.send_signal(signal.SIGKILL)  # the main process only, not its group
    proc.wait(timeout=60)
    workers = subprocess.run(
        ['pgrep', '-g', str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    code, out = launch(tmp_path, '', *opts)
    assert code == 0, f'{len(workers)} orphaned workers at the restart: {out[-2000:]}'
    assert 'resumed from' in out and 'in use by another run' not in out
    final = load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_1.pth'))['model']
    assert_same_weights(reference_weights, final)


def _stop_mid_epoch(tmp_path, send):
    """Start a run with two DataLoader workers, `send` it a stop during epoch 0, and return its
    exit code, output and the step checkpoints it left."""
    proc = launch(tmp_path, 'slow:0.1', 'DATA.NUM_WORKERS', 2, wait=False)
    wait_for(proc, os.path.join(run_dir(tmp_path), 'log_rank0.txt'), 'Train: [0/2][2/6]')
    send(proc)
    out, _ = proc.communicate(timeout=240)
    return (
        proc.returncode,
        out,
        [n for n in os.listdir(run_dir(tmp_path)) if '_step_' in n and n.endswith('.pth')],
    )


def test_sigterm_to_the_whole_process_group_with_workers_saves_and_resumes_exactly(
    tmp_path, reference_weights
):
    """`timeout -s TERM`, `kill -TERM -PGID`, systemd and `scancel` without --signal=B: signal
    every process of the job, the DataLoader workers included."""
    code, out, step_files = _stop_mid_epoch(tmp_path, lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert 'Preempted: Stopped by SIGTERM after step' in out and 'Traceback' not in out
    assert len(step_files) == 1
    code, out = launch(tmp_path, '', 'DATA.NUM_WORKERS', 2)
    assert code == 0 and f'resumed from {os.path.join(run_dir(tmp_path), step_files[0])}' in out
    final = load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_1.pth'))['model']
    assert_same_weights(reference_weights, final)


def test_ctrl_c_to_the_process_group_with_workers_saves_a_step_checkpoint(tmp_path):
    code, out, step_files = _stop_mid_epoch(tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert 'Preempted: Stopped by SIGINT after step' in out and 'Traceback' not in out
    assert len(step_files) == 1


def test_a_nan_loss_is_skipped_without_touching_weights_or_optimizer_state(tmp_path):
    code, out = launch(
        tmp_path,
        'nan:3',
        'PRINT_FREQ',
        1,
        'CHECKPOINT.STEP_FREQ',
        1,
        'CHECKPOINT.KEEP_STEP_CKPTS',
        20,
    )
    assert code == 0, out[-2000:]
    assert 'skipped 1' in out
    # Update 3 was skipped: the state after it is the state after update 2, bit for bit; update 4
    # trains again.
    after = [
        load_checkpoint_file(os.path.join(run_dir(tmp_path), f'ckpt_epoch_0_step_{k}.pth'))
        for k in (2, 3, 4)
    ]
    assert_same_tree(after[0]['model'], after[1]['model'])
    assert_same_tree(after[0]['optimizer']['state'], after[1]['optimizer']['state'])
    assert not torch.equal(
        after[1]['model']['encoder.patch_embed.proj.weight'],
        after[2]['model']['encoder.patch_embed.proj.weight'],
    )


def test_a_run_whose_last_window_was_all_skipped_never_ends_well(tmp_path):
    """Every step of the 12 non-finite, fewer than TRAIN.MAX_NONFINITE_STEPS: exit 3, and no final
    checkpoint of the weights that trained nothing."""
    code, out = launch(
        tmp_path, 'nan:' + ','.join(map(str, range(1, 13))), 'TRAIN.MAX_NONFINITE_STEPS', 100
    )
    assert code == 3, out[-2000:]
    assert '12 consecutive optimizer steps (since update 0, epoch 1)' in out
    assert not os.path.exists(os.path.join(run_dir(tmp_path), 'ckpt_epoch_1.pth'))


def test_consecutive_nan_losses_are_counted_across_an_epoch_boundary(tmp_path):
    """Updates 5-8 skipped (6 per epoch: the last two of epoch 0, the first two of epoch 1)."""
    code, out = launch(tmp_path, 'nan:5,6,7,8', 'TRAIN.MAX_NONFINITE_STEPS', 4, 'PRINT_FREQ', 100)
    assert code == 3, out[-2000:]
    assert '4 consecutive optimizer steps (since update 4, epoch 1)' in out


def test_consecutive_nan_losses_stop_the_run_with_remedies(tmp_path):
    code, out = launch(
        tmp_path,
        'nan:' + ','.join(map(str, range(4, 13))),
        'TRAIN.MAX_NONFINITE_STEPS',
        3,
        'PRINT_FREQ',
        100,
    )
    assert code == 3, out[-2000:]
    assert '3 consecutive optimizer steps (since update 3, epoch 0)' in out
    assert 'Last good checkpoint: none written yet' in out and 'lower TRAIN.BASE_LR' in out
    assert 'Traceback' not in out


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    code, out = launch(tmp_path, 'disk_full:2')
    assert code == 1
    assert 'the disk is full' in out and 'earlier checkpoints' in out and 'Traceback' not in out
    names = os.listdir(run_dir(tmp_path))
    assert 'ckpt_epoch_0.pth' in names and not any(n.endswith('.tmp') for n in names)
    assert load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_0.pth'))['epoch'] == 0


def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step(tmp_path):
    """torchrun forwards SIGTERM to each rank's whole process group (os.killpg), so the ranks'
    DataLoader workers receive it too."""
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    out = tmp_path / 'out'
    proc = subprocess.Popen(
        [
            torchrun,
            '--nproc_per_node',
            '2',
            '--standalone',
            os.path.join(ROOT, 'main_simmim.py'),
            '--cfg',
            TINY,
            '--output',
            str(out),
            '--opts',
            'TRAIN.EPOCHS',
            '50',
            'DATA.BATCH_SIZE',
            '4',
            'DATA.NUM_WORKERS',
            '1',
        ],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'},
    )
    logs = os.path.join(str(out), 'simmim_pretrain', 'tiny')
    wait_for(proc, os.path.join(logs, 'log_rank0.txt'), 'ckpt_epoch_1.pth saved')
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    proc.communicate(timeout=120)
    messages = [
        open(os.path.join(logs, f'log_rank{r}.txt')).read().split('Preempted: ')[-1].split('\n')[0]
        for r in (0, 1)
    ]
    assert all(m.startswith('Stopped by') for m in messages)
    # Both ranks stopped after the same step, and name the same checkpoint.
    assert messages[0].split(' after ', 1)[1] == messages[1].split(' after ', 1)[1]
    step_files = [n for n in os.listdir(logs) if '_step_' in n and n.endswith('.pth')]
    assert len(step_files) == 1 and step_files[0] in messages[0]


def test_sigterm_and_resume_on_shards_in_window_order_match_an_uninterrupted_run(tmp_path):
    """The tiny run on tar shards (written by tools.make_shards from the synthetic images) in the
    window order: stopped by SIGTERM mid-epoch and resumed, it ends with the weights of the run
    left alone, and its checkpoints record the shard set."""
    images = tmp_path / 'images'
    for index in range(48):
        image, label = SyntheticShapes(48, 4, 64)[index]
        os.makedirs(images / str(label), exist_ok=True)
        image.save(images / str(label) / f'{index:02d}.png')
    convert(str(images), str(tmp_path / 'shards'), shard_size=8, log=lambda _: None)
    opts = ['DATA.DATASET', 'folder', 'DATA.DATA_PATH', str(tmp_path / 'shards')]
    opts += ['DATA.SHARD_SHUFFLE', 'window', 'DATA.SHARD_WINDOW', '2']
    reference = tmp_path / 'reference'
    assert run(main_simmim.main, ['--cfg', TINY, '--output', str(reference), '--opts', *opts]) == 0
    path = os.path.join(str(reference), 'simmim_pretrain', 'tiny', 'ckpt_epoch_1.pth')
    reference_checkpoint = load_checkpoint_file(path)
    assert reference_checkpoint['train_state']['data']['samples'] == 48
    proc = launch(tmp_path, 'slow:0.1', *opts, wait=False)
    wait_for(proc, os.path.join(run_dir(tmp_path), 'log_rank0.txt'), 'Train: [0/2][2/6]')
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    assert 'Data format: tar shards; all: 6 shards, 48 samples' in out
    code, out = launch(tmp_path, '', *opts)
    assert code == 0 and 'resumed from' in out, out[-2000:]
    final = load_checkpoint_file(os.path.join(run_dir(tmp_path), 'ckpt_epoch_1.pth'))['model']
    assert_same_weights(reference_checkpoint['model'], final)
