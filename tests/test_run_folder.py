"""engine/run_folder.py and what a run shows about itself: one run per output folder, the config
record, a finished run started again, the whole-run ETA, the epoch's loss, TensorBoard's axis."""

import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import main_simmim
from checkpoint.stored_config import require_same_data
from config import load_config
from data.synthetic import SyntheticShapes
from engine import run_folder
from engine.launch import run
from tests.conftest import ROOT
from utils.errors import ConfigError

pytestmark = pytest.mark.slow

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')
# main_simmim as on the command line, but its first step waits until the file $RELEASE exists.
WAITING_MAIN = (
    'import os, sys, time; sys.path.insert(0, {root!r})\n'
    'import main_simmim\nfrom engine import batch_loss as tasks\nfrom engine.launch import run\n'
    'task = tasks.PretrainBatchLoss.__call__\n'
    'def waiting(*args):\n'
    '    while not os.path.exists(os.environ["RELEASE"]):\n'
    '        time.sleep(0.05)\n'
    '    return task(*args)\n'
    'tasks.PretrainBatchLoss.__call__ = waiting\n'
    'sys.exit(run(main_simmim.main, sys.argv[1:]))\n'
)


def pretrain(output, *opts, extra=()):
    argv = ['--cfg', TINY, '--output', str(output), *extra]
    return run(main_simmim.main, argv + (['--opts', *map(str, opts)] if opts else []))


def run_dir(output):
    return os.path.join(str(output), 'simmim_pretrain', 'tiny')


def dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------
# One run per output folder
# ------------------------------------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_stops_at_once_naming_the_first(tmp_path):
    release = tmp_path / 'release'
    first = subprocess.Popen(
        [
            sys.executable,
            '-c',
            WAITING_MAIN.format(root=ROOT),
            '--cfg',
            TINY,
            '--output',
            str(tmp_path),
            '--opts',
            'TRAIN.EPOCHS',
            '1',
        ],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, 'PYTHONUNBUFFERED': '1', 'RELEASE': str(release)},
    )
    log = os.path.join(run_dir(tmp_path), 'log_rank0.txt')
    deadline = time.time() + 180
    while not (os.path.exists(log) and 'Start training' in open(log).read()):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.1)
    second = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'main_simmim.py'),
            '--cfg',
            TINY,
            '--output',
            str(tmp_path),
            '--opts',
            'TRAIN.EPOCHS',
            '1',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert first.poll() is None  # still in its first step
    release.touch()
    out, _ = first.communicate(timeout=240)
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
    message = second.stderr
    assert f'is in use by another run: pid {first.pid} on host {socket.gethostname()}' in message
    assert '--tag NAME' in message and '--output DIR' in message and 'Traceback' not in message
    # The folder holds one run's files: the log never mentions a second start.
    assert open(log).read().count('RANK 0 WORLD_SIZE 1') == 1
    assert not os.path.exists(os.path.join(run_dir(tmp_path), run_folder.LOCK_NAME))


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_log_line(tmp_path):
    folder = run_dir(tmp_path)
    os.makedirs(folder)
    stale = {'host': socket.gethostname(), 'pid': dead_pid(), 'started': '2026-01-02T03:04:05'}
    with open(os.path.join(folder, run_folder.LOCK_NAME), 'w') as f:
        json.dump(stale, f)
    assert pretrain(tmp_path, 'TRAIN.EPOCHS', 1) == 0
    log = open(os.path.join(folder, 'log_rank0.txt')).read()
    assert (
        f'left by a run that did not exit cleanly (pid {stale["pid"]} on host '
        f'{stale["host"]}, started 2026-01-02T03:04:05)'
    ) in log
    assert not os.path.exists(os.path.join(folder, run_folder.LOCK_NAME))


@pytest.mark.parametrize(
    'holder, busy', [('live pid here', True), ('dead pid here', False), ('another host', True)]
)
def test_without_working_locks_the_lock_file_content_decides(tmp_path, monkeypatch, holder, busy):
    """On a file system without working locks, a lock naming a live process (or one on another
    host, which cannot be checked) stops the run; one naming a dead process here is stale."""
    monkeypatch.setattr(run_folder, 'fcntl', None)
    pid = {'live pid here': os.getppid(), 'dead pid here': dead_pid(), 'another host': 1}[holder]
    host = 'elsewhere.example' if holder == 'another host' else socket.gethostname()
    (tmp_path / run_folder.LOCK_NAME).write_text(json.dumps({'host': host, 'pid': pid}))
    if busy:
        with pytest.raises(run_folder.OutputFolderBusy, match=f'pid {pid} on host {host}'):
            run_folder.acquire_output_folder(str(tmp_path))
    else:
        assert 'Took over' in run_folder.acquire_output_folder(str(tmp_path))
        assert json.loads((tmp_path / run_folder.LOCK_NAME).read_text())['pid'] == os.getpid()
        run_folder.release_output_folders()
        assert not (tmp_path / run_folder.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------
# A finished two-epoch run, started again in several ways
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished 2-epoch run with TensorBoard, reconstructions and a log line every step."""
    output = tmp_path_factory.mktemp('finished')
    assert pretrain(output, 'TENSORBOARD', True, 'VIS_FREQ', 1, 'PRINT_FREQ', 1) == 0
    return output


def copy_of(finished, tmp_path):
    shutil.copytree(finished, tmp_path / 'out')
    return tmp_path / 'out'


def test_a_failed_start_keeps_the_config_of_the_run(finished, tmp_path):
    output = copy_of(finished, tmp_path)
    config_path = os.path.join(run_dir(output), 'config.yaml')
    before = open(config_path).read()
    code = pretrain(
        output,
        'TENSORBOARD',
        True,
        'VIS_FREQ',
        1,
        'PRINT_FREQ',
        1,
        'DATA.DATASET',
        'folder',
        extra=['--data-path', str(tmp_path / 'mistyped'), '--batch-size', '4'],
    )
    assert open(config_path).read() == before
    assert [n for n in os.listdir(run_dir(output)) if n.startswith('config')] == ['config.yaml']
    assert code == 2  # a data error: the command must change


def test_a_changed_config_keeps_the_previous_one_beside_it(finished, tmp_path):
    output = copy_of(finished, tmp_path)
    before = open(os.path.join(run_dir(output), 'config.yaml')).read()
    assert (
        pretrain(output, 'TENSORBOARD', True, 'VIS_FREQ', 1, 'PRINT_FREQ', 1, 'TRAIN.EPOCHS', 3)
        == 0
    )
    configs = sorted(n for n in os.listdir(run_dir(output)) if n.startswith('config'))
    assert len(configs) == 2 and re.fullmatch(r'config\.\d{8}-\d{6}\.yaml', configs[0])
    assert open(os.path.join(run_dir(output), configs[0])).read() == before
    assert 'EPOCHS: 3' in open(os.path.join(run_dir(output), 'config.yaml')).read()
    log = open(os.path.join(run_dir(output), 'log_rank0.txt')).read()
    assert f'the previous config is kept as {os.path.join(run_dir(output), configs[0])}' in log
    assert 'TRAIN.EPOCHS 2 -> 3' in log.split('Changed: ')[1].splitlines()[0]


def test_a_finished_run_started_again_says_so_and_trains_nothing(finished, tmp_path, capsys):
    output = copy_of(finished, tmp_path)
    files = {
        n: os.path.getmtime(os.path.join(run_dir(output), n))
        for n in os.listdir(run_dir(output))
        if n.endswith(('.pth', '.yaml'))
    }
    capsys.readouterr()
    assert pretrain(output, 'TENSORBOARD', True, 'VIS_FREQ', 1, 'PRINT_FREQ', 1) == 0
    out = capsys.readouterr().out
    assert 'This run has already finished' in out and 'ckpt_epoch_1.pth holds all 2 epochs' in out
    assert 'Train: [' not in out
    assert files == {n: os.path.getmtime(os.path.join(run_dir(output), n)) for n in files}


def test_pretrained_weights_given_to_a_run_that_continues_are_said_to_be_unused(
    finished, tmp_path, capsys
):
    output = copy_of(finished, tmp_path)
    capsys.readouterr()
    opts = ('TENSORBOARD', True, 'VIS_FREQ', 1, 'PRINT_FREQ', 1, 'MODEL.PRETRAINED', 'enc.pth')
    assert pretrain(output, *opts) == 0
    out = capsys.readouterr().out
    assert (
        'MODEL.PRETRAINED is not loaded: ' in out and 'ckpt_epoch_1.pth continues this run' in out
    )


# ------------------------------------------------------------------------------------------------
# What the log and TensorBoard show
# ------------------------------------------------------------------------------------------------
def _progress_lines(log):
    pattern = r'Train: \[(\d+)/2\]\[(\d+)/6\]\teta (\S+) \(run (\S+)\) .*?\tloss (\S+) '
    return [
        (int(e), int(i), _seconds(eta), _seconds(run_eta), float(loss))
        for e, i, eta, run_eta, loss in re.findall(pattern, log)
    ]


def _seconds(text):
    t = datetime.datetime.strptime(text, '%H:%M:%S')
    return t.hour * 3600 + t.minute * 60 + t.second


def test_log_lines_show_the_run_eta_and_the_epochs_average_loss(finished):
    log = open(os.path.join(run_dir(finished), 'log_rank0.txt')).read()
    lines = _progress_lines(log)
    assert [(e, i) for e, i, *_ in lines] == [(e, i) for e in (0, 1) for i in range(6)]
    for epoch, _idx, eta, run_eta, _ in lines:
        assert run_eta >= eta and (epoch == 0 or run_eta == eta)  # the last epoch: the same
    assert lines[-1][2:4] == (0, 0)
    for epoch in (0, 1):
        losses = [loss for e, _, _, _, loss in lines if e == epoch]  # equal batches: plain mean
        average = float(
            re.search(rf'EPOCH {epoch} training takes \S+, loss avg (\S+)', log).group(1)
        )
        assert average == pytest.approx(sum(losses) / len(losses), abs=2e-4)


def test_reconstructions_are_on_the_training_scalars_step_axis(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        os.path.join(run_dir(finished), 'tensorboard'), size_guidance={'images': 0, 'scalars': 0}
    )
    events.Reload()
    loss_steps = [e.step for e in events.Scalars('train/loss')]
    assert loss_steps == list(range(12))  # epoch * 6 + index, one per step
    # Each grid sits at the last training step of its epoch, beside that step's scalars.
    assert [e.step for e in events.Images('reconstruction')] == [5, 11]


# ------------------------------------------------------------------------------------------------
# Which run a start continues: the data it trained on, its own config.yaml
# ------------------------------------------------------------------------------------------------
def image_folder(root, count=16):
    images = SyntheticShapes(count, 2, 64, seed=0)
    os.makedirs(root)
    for i in range(count):
        images[i][0].save(os.path.join(root, f'{i:03d}.png'))
    return str(root)


def test_a_new_experiment_on_other_data_in_the_same_folder_stops_naming_both(
    finished, tmp_path, capsys
):
    # --data-path with the synthetic quickstart config switches to that folder; the folder's run
    # was trained on the built-in set, so auto-resume must not continue (nor call it finished).
    output = copy_of(finished, tmp_path)
    images = image_folder(tmp_path / 'images')
    files = {  # checkpoints and config untouched (the log gains the message)
        n: os.path.getmtime(os.path.join(run_dir(output), n))
        for n in os.listdir(run_dir(output))
        if n.endswith(('.pth', '.yaml', '.checksum'))
    }
    capsys.readouterr()
    assert pretrain(output, 'TENSORBOARD', True, extra=['--data-path', images]) == 2
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert 'Auto-resume found' in out and 'ckpt_epoch_1.pth' in out
    assert 'the built-in synthetic dataset' in out and f'the image folder {images}' in out
    assert '--tag NEW_NAME' in out and 'already finished' not in out and 'Traceback' not in out
    assert files == {n: os.path.getmtime(os.path.join(run_dir(output), n)) for n in files}
    # Under its own tag the same command trains on the folder, and the log says why.
    assert pretrain(output, 'TRAIN.EPOCHS', 1, extra=['--data-path', images, '--tag', 'new']) == 0
    log = open(os.path.join(str(output), 'simmim_pretrain', 'new', 'log_rank0.txt')).read()
    assert 'DATA.DATASET is now folder' in log and f'16 images from {images}' in log
    assert 'TRAIN.WARMUP_EPOCHS 1 is not shorter than TRAIN.EPOCHS 1' in log


def test_a_run_started_again_from_its_config_yaml_continues_in_its_folder(tmp_path):
    output = tmp_path / 'out'
    assert pretrain(output, 'TRAIN.EPOCHS', 1) == 0
    config_yaml = os.path.join(run_dir(output), 'config.yaml')
    before = open(config_yaml).read()
    argv = ['--cfg', config_yaml, '--opts', 'TRAIN.EPOCHS', '2']  # no --output: the stored one
    assert run(main_simmim.main, argv) == 0
    log = open(os.path.join(run_dir(output), 'log_rank0.txt')).read()
    assert f'resumed from {os.path.join(run_dir(output), "ckpt_epoch_0.pth")}' in log
    assert 'Train: [1/2]' in log and os.path.isfile(
        os.path.join(run_dir(output), 'ckpt_epoch_1.pth')
    )
    # The learning rates and OUTPUT read back as they were: only the epochs changed.
    assert log.split('Changed: ')[1].splitlines()[0] == 'TRAIN.EPOCHS 1 -> 2'
    assert open(config_yaml).read() == before.replace('\n  EPOCHS: 1\n', '\n  EPOCHS: 2\n')


def test_the_same_data_spelled_differently_is_the_same_run(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    stored = load_config(TINY, opts=['DATA.DATASET', 'imagenet', 'DATA.DATA_PATH', str(folder)])
    checkpoint = {'config': stored.dump()}
    for dataset, path in [('folder', f'{folder}/'), ('imagenet', str(tmp_path / '.' / 'images'))]:
        config = load_config(TINY, opts=['DATA.DATASET', dataset, 'DATA.DATA_PATH', path])
        require_same_data(config, 'ckpt_epoch_0.pth', checkpoint)  # passes
    other = load_config(TINY, opts=['DATA.DATASET', 'folder', 'DATA.DATA_PATH', str(tmp_path)])
    with pytest.raises(ConfigError, match=f'the image folder {tmp_path} '):
        require_same_data(other, 'ckpt_epoch_0.pth', checkpoint)


def test_the_same_folder_staged_elsewhere_continues_and_another_one_does_not(tmp_path):
    """A requeued job that copies its data to /scratch/JOB_ID/... resumes; same-named folders of
    other datasets do not."""
    stored = load_config(
        TINY, opts=['DATA.DATASET', 'folder', 'DATA.DATA_PATH', '/data/in1k/train']
    )
    checkpoint = {'config': stored.dump()}
    staged = load_config(
        TINY, opts=['DATA.DATASET', 'folder', 'DATA.DATA_PATH', '/scratch/4242/in1k/train/']
    )
    require_same_data(staged, 'ckpt_epoch_0.pth', checkpoint)  # passes
    for path in ('/data/in22k/train', '/data/in1k/val'):
        other = load_config(TINY, opts=['DATA.DATASET', 'folder', 'DATA.DATA_PATH', path])
        with pytest.raises(ConfigError, match='--tag NEW_NAME'):
            require_same_data(other, 'ckpt_epoch_0.pth', checkpoint)
    require_same_data(other, 'official.pth', {'config': {'DATA': {}}})  # official: cannot tell
