"""tools/slurm.py: the batch script it writes, run by bash with stand-ins for srun, scontrol and
torchrun (SLURM itself is not needed): the torchrun command line, and requeueing when SIGTERM
arrives or the job exits with 75, but not when it finishes or fails."""

import os
import shlex
import signal
import subprocess
import time

import pytest

from tools import slurm

FAKES = {
    'scontrol': """#!/bin/bash
if [ "$1" = show ]; then printf 'node-a\\nnode-b\\n'; else echo "$@" >> "$FAKE_DIR/scontrol.log"; fi
""",
    'srun': """#!/bin/bash
shift  # --kill-on-bad-exit=1
exec "$@"
""",
    # torchrun exits 1 when its workers stop with 75 after a SIGTERM, as the real one does.
    'torchrun': """#!/bin/bash
trap 'kill $child; echo TERM >> "$FAKE_DIR/torchrun.log"; exit 1' TERM
printf '%s\\n' "$@" > "$FAKE_DIR/torchrun.args"
sleep "$FAKE_SLEEP" > /dev/null &
child=$!
wait $child
exit "$FAKE_EXIT"
""",
}
COMMAND = [
    'main_simmim.py',
    '--cfg',
    'configs/my run.yaml',
    '--opts',
    'CHECKPOINT.STEP_FREQ',
    '1000',
]


def write_job(tmp_path, *options):
    script = slurm.build_script(slurm.build_parser().parse_args([*options, '--', *COMMAND]))
    path = tmp_path / 'job.sh'
    path.write_text(script)
    for name, text in FAKES.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return script, path


def start(tmp_path, path, exit_code=0, sleep=0):
    env = {
        **os.environ,
        'PATH': f'{tmp_path}:{os.environ["PATH"]}',
        'FAKE_DIR': str(tmp_path),
        'FAKE_EXIT': str(exit_code),
        'FAKE_SLEEP': str(sleep),
        'SLURM_JOB_ID': '42',
        'SLURM_NNODES': '2',
        'SLURM_JOB_NODELIST': 'node-[a-b]',
    }
    return subprocess.Popen(['bash', str(path)], env=env, stdout=subprocess.PIPE, text=True)


def requeues(tmp_path):
    log = tmp_path / 'scontrol.log'
    return log.read_text().splitlines() if log.exists() else []


def test_sbatch_options_and_one_torchrun_per_node(tmp_path):
    script, path = write_job(
        tmp_path,
        '--nodes',
        '2',
        '--gpus-per-node',
        '4',
        '--time',
        '2:00:00',
        '--signal-seconds',
        '240',
        '--partition',
        'gpu',
    )
    for line in (
        '#SBATCH --nodes=2',
        '#SBATCH --ntasks-per-node=1',
        '#SBATCH --gpus-per-node=4',
        '#SBATCH --time=2:00:00',
        '#SBATCH --requeue',
        '#SBATCH --signal=B:TERM@240',
        '#SBATCH --partition=gpu',
    ):
        assert line in script.splitlines()
    job = start(tmp_path, path)
    assert job.wait(timeout=60) == 0
    args = (tmp_path / 'torchrun.args').read_text().splitlines()
    assert args == [
        '--nnodes',
        '2',
        '--nproc_per_node',
        '4',
        '--rdzv_backend',
        'c10d',
        '--rdzv_endpoint',
        'node-a:29500',
        '--rdzv_id',
        '42',
        *COMMAND,
    ]
    assert requeues(tmp_path) == []


@pytest.mark.parametrize('exit_code, requeued, script_exit', [(75, True, 0), (3, False, 3)])
def test_requeue_on_exit_code_75_only(tmp_path, exit_code, requeued, script_exit):
    _, path = write_job(tmp_path)
    job = start(tmp_path, path, exit_code=exit_code)
    assert job.wait(timeout=60) == script_exit
    assert requeues(tmp_path) == (['requeue 42'] if requeued else [])


def test_sigterm_is_forwarded_and_the_job_requeued(tmp_path):
    _, path = write_job(tmp_path)
    job = start(tmp_path, path, sleep=60)
    deadline = time.time() + 30
    while not (tmp_path / 'torchrun.args').exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@... does
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0 and 'requeueing job 42' in out
    assert (tmp_path / 'torchrun.log').read_text() == 'TERM\n'
    assert requeues(tmp_path) == ['requeue 42']


def test_user_arguments_are_quoted():
    args = slurm.build_parser().parse_args(['--', *COMMAND])
    srun_line = next(
        line for line in slurm.build_script(args).splitlines() if line.startswith('srun')
    )
    assert shlex.split(srun_line.rstrip(' &'))[-len(COMMAND) :] == COMMAND


def test_command_must_start_with_the_training_script(capsys):
    with pytest.raises(SystemExit) as info:
        slurm.main(['--', 'torchrun', 'main_simmim.py'])
    assert info.value.code == 2 and 'must start with the training script' in capsys.readouterr().err


@pytest.fixture
def job_folder(tmp_path, monkeypatch):
    """A folder holding the training script, as the repository the job is submitted from."""
    (tmp_path / 'main_simmim.py').write_text('')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(capsys, *options, command=('main_simmim.py',)):
    """The message of slurm.main refusing `options` (exit code 2, no script written)."""
    with pytest.raises(SystemExit) as info:
        slurm.main([*options, '--', *command])
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.out == ''
    return captured.err


@pytest.mark.parametrize(
    'limit, seconds',
    [
        ('90', 90 * 60),
        ('30:15', 30 * 60 + 15),
        ('2:00:00', 2 * 3600),
        ('1-12', 36 * 3600),
        ('1-12:30', 36 * 3600 + 30 * 60),
        ('2-00:00:05', 48 * 3600 + 5),
    ],
)
def test_every_slurm_time_form_is_accepted(job_folder, capsys, limit, seconds):
    assert slurm.time_limit_seconds(limit) == seconds
    assert slurm.main(['--time', limit, '--signal-seconds', '60', '--', 'main_simmim.py']) == 0
    assert f'#SBATCH --time={limit}' in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize('limit', ['24h', '1:2:3:4', '1-', '-5', '1-2-3', '12:', '', '0:0:0'])
def test_a_time_limit_slurm_does_not_take_is_refused(job_folder, capsys, limit):
    err = refused(capsys, '--time', limit)
    assert f'--time {limit!r}' in err and ('MM, MM:SS, HH:MM:SS' in err or 'no time' in err)


def test_a_warning_signal_not_shorter_than_the_time_limit_is_refused(job_folder, capsys):
    err = refused(capsys, '--time', '5', '--signal-seconds', '300')  # 5 minutes
    assert '--signal-seconds 300 is not shorter than the time limit' in err
    assert 'between 1 and 65535' in refused(capsys, '--time', '2-00', '--signal-seconds', '70000')
    assert slurm.main(['--time', '6', '--signal-seconds', '300', '--', 'main_simmim.py']) == 0


def test_a_training_script_that_does_not_exist_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, command=('main_simmmim.py', '--cfg', 'x.yaml'))
    assert 'main_simmmim.py does not exist' in err


@pytest.mark.parametrize(
    'options',
    [
        ['--job-name', 'my run'],
        ['--partition', 'gpu\n#SBATCH --exclusive'],
        ['--log-dir', 'my logs'],
        ['--sbatch-option', '--comment=two words'],
        ['--sbatch-option=--account=a\tb'],
        ['--job-name', ''],
    ],
)
def test_sbatch_values_with_whitespace_are_refused(job_folder, capsys, options):
    assert 'an #SBATCH value may not be empty or hold spaces' in refused(capsys, *options)


def test_the_log_folder_is_created_with_the_script(job_folder, capsys):
    assert not (job_folder / 'runs').exists()
    assert slurm.main(['--log-dir', 'runs/logs', '--', 'main_simmim.py']) == 0
    assert (job_folder / 'runs' / 'logs').is_dir()
    assert '#SBATCH --output=runs/logs/%x-%j.out' in capsys.readouterr().out.splitlines()
