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
