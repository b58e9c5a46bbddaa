"""What we read back is what we wrote: checksums of every checkpoint file (both layouts), weights
that hold NaN or Inf refused wherever they are loaded, and a mid-epoch position that resumes
exactly on another world size."""

import logging
import os
import shutil

import pytest
import torch

import main_finetune
import main_simmim
from checkpoint import sharded
from checkpoint.layout import (
    TrainingState,
    epoch_checkpoint_path,
    prune_step_checkpoints,
    step_checkpoint_path,
)
from checkpoint.resume import find_resume_checkpoint, verify_resume_checkpoint
from config import load_config
from data.sampler import ResumableDistributedSampler
from engine.checkpoint_policy import CheckpointPolicy
from engine.evaluation import load_eval_weights
from engine.launch import run
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from tests.conftest import ROOT
from tests.test_sharded_checkpoint import ONE_PROCESS, save, trained
from utils.atomic_write import atomic_save
from utils.checksum import file_record, read_sidecar, sidecar_path
from utils.errors import CheckpointError, NonFiniteLossError
from utils.safe_load import load_checkpoint_file

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')
LOGGER = logging.getLogger('test_integrity')


def damage(path, size=4096):
    """Invert `size` bytes in the middle of the file at `path` (bit rot; its size unchanged)."""
    offset = max(os.path.getsize(path) // 2 - size // 2, 0)
    with open(path, 'r+b') as f:
        f.seek(offset)
        data = f.read(size)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def tensors(tree, prefix=''):
    """{dotted name: tensor} of every tensor in a checkpoint dict."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    found = {}
    if isinstance(tree, (dict, list, tuple)):
        for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
            found.update(tensors(value, f'{prefix}.{key}'))
    return found


def pretrain(capfd, output, *args, opts=()):
    code = run(main_simmim.main, ['--cfg', TINY, '--output', str(output), *args, '--opts', *opts])
    captured = capfd.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A finished 2-epoch tiny run: ckpt_epoch_0.pth and ckpt_epoch_1.pth with their records."""
    out = tmp_path_factory.mktemp('finished')
    assert run(main_simmim.main, ['--cfg', TINY, '--output', str(out)]) == 0
    return os.path.join(str(out), 'simmim_pretrain', 'tiny')


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, at the same place under `tmp_path / 'out'`."""
    folder = os.path.join(str(tmp_path / 'out'), 'simmim_pretrain', 'tiny')
    shutil.copytree(finished_run, folder)
    return folder


def test_every_checkpoint_we_write_records_the_checksum_of_its_bytes(finished_run):
    for name in ('ckpt_epoch_0.pth', 'ckpt_epoch_1.pth'):
        path = os.path.join(finished_run, name)
        record = read_sidecar(path)
        assert record == file_record(path) and record['size'] == os.path.getsize(path)


def test_a_4kb_overwrite_inside_a_checkpoint_file_is_caught(run_copy):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    before = tensors(torch.load(path, weights_only=True))
    damage(path)
    # The damage lands in tensor bytes that torch.load reads without complaint ...
    after = tensors(torch.load(path, weights_only=True))
    assert before.keys() == after.keys()
    assert any(not torch.allclose(before[k], after[k], equal_nan=True) for k in before)
    # ... so only the checksum sees it.
    with pytest.raises(CheckpointError, match='checksum') as info:
        verify_resume_checkpoint(path)
    assert path in str(info.value)


def test_an_explicit_resume_of_a_damaged_file_stops_with_exit_2_naming_it(
    capfd, run_copy, tmp_path
):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    damage(path)
    code, out = pretrain(
        capfd, tmp_path / 'out', '--resume', path, opts=['TRAIN.AUTO_RESUME', 'False']
    )
    assert code == 2 and path in out and 'checksum' in out and 'Traceback' not in out


def test_auto_resume_skips_a_damaged_checkpoint_and_takes_the_next_intact_one(
    capfd, run_copy, tmp_path
):
    damage(os.path.join(run_copy, 'ckpt_epoch_1.pth'))
    code, out = pretrain(capfd, tmp_path / 'out', opts=['TRAIN.EPOCHS', '3'])
    log = open(os.path.join(run_copy, 'log_rank0.txt')).read()
    assert code == 0, out[-2000:]
    assert f'auto-resume: skipping {os.path.join(run_copy, "ckpt_epoch_1.pth")}' in log
    assert (
        f'resumed from {os.path.join(run_copy, "ckpt_epoch_0.pth")}: continuing at epoch 1' in log
    )


def test_a_file_without_a_record_loads_with_a_line_saying_it_was_not_verified(run_copy, caplog):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    os.remove(sidecar_path(path))
    with caplog.at_level(logging.INFO, logger='simmim.checkpoint'):
        checkpoint = verify_resume_checkpoint(path)
    assert checkpoint['epoch'] == 1
    assert f'{path}: no checksum recorded' in caplog.text and 'not verified' in caplog.text


def test_a_truncated_file_is_refused(run_copy):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError) as info:
        verify_resume_checkpoint(path)
    assert path in str(info.value)


def test_pruning_removes_a_checkpoint_with_its_record(tmp_path):
    for step in (2, 4, 6):
        atomic_save({'step': step}, step_checkpoint_path(str(tmp_path), 0, step), checksum=True)
    prune_step_checkpoints(str(tmp_path), keep=1)
    assert sorted(os.listdir(tmp_path)) == [
        'ckpt_epoch_0_step_6.pth',
        'ckpt_epoch_0_step_6.pth.checksum',
    ]


# ----------------------------------------------------------------------------- sharded layout
@pytest.fixture
def two_sharded(tmp_path):
    """Two sharded checkpoints of one run folder: after steps 2 and 4 of epoch 1."""
    config, model, optimizer, scheduler = trained()
    older = save(str(tmp_path / 'ckpt_epoch_1_step_2'), config, model, optimizer, scheduler)
    newer = save(str(tmp_path / 'ckpt_epoch_1_step_4'), config, model, optimizer, scheduler, (1, 4))
    return older, newer


def test_a_4kb_overwrite_inside_a_shard_is_a_bad_candidate(two_sharded, tmp_path, caplog):
    older, newer = two_sharded
    shard = os.path.join(newer, '__0_0.distcp')
    damage(shard)
    with pytest.raises(CheckpointError, match='checksum') as info:
        verify_resume_checkpoint(newer)
    assert shard in str(info.value)
    with caplog.at_level(logging.WARNING):
        path, _ = find_resume_checkpoint(str(tmp_path), LOGGER)
    assert path == older and f'skipping {newer}' in caplog.text


def test_a_truncated_shard_is_a_bad_candidate(two_sharded, tmp_path):
    older, newer = two_sharded
    shard = os.path.join(newer, '__0_0.distcp')
    with open(shard, 'r+b') as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError) as info:
        verify_resume_checkpoint(newer)
    assert shard in str(info.value)
    assert find_resume_checkpoint(str(tmp_path), LOGGER)[0] == older


def test_the_complete_marker_records_every_file_of_the_checkpoint(two_sharded):
    _, newer = two_sharded
    recorded = sharded.read_marker(newer)['files']
    on_disk = sorted(n for n in os.listdir(newer) if n != sharded.MARKER)
    assert sorted(recorded) == on_disk
    assert all(recorded[n] == file_record(os.path.join(newer, n)) for n in on_disk)


# ----------------------------------------------------------------------------- non-finite weights
def poison(path, key=None):
    """Rewrite the checkpoint at `path` (with a valid record) with a NaN in one weight; return its
    name."""
    checkpoint = load_checkpoint_file(path)
    weights = checkpoint['model'] if 'model' in checkpoint else checkpoint
    key = key or next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float('nan')
    atomic_save(checkpoint, path, checksum=True)
    return key


def test_resuming_nan_weights_stops_with_exit_2_naming_the_tensor(capfd, run_copy, tmp_path):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    key = poison(path)
    code, out = pretrain(
        capfd, tmp_path / 'out', '--resume', path, opts=['TRAIN.AUTO_RESUME', 'False']
    )
    assert code == 2 and 'NaN or infinite' in out and key in out and path in out


def test_auto_resume_passes_over_nan_weights(run_copy, caplog):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    poison(path)
    with caplog.at_level(logging.WARNING):
        found, _ = find_resume_checkpoint(run_copy, LOGGER)
    assert found == os.path.join(run_copy, 'ckpt_epoch_0.pth') and 'NaN or infinite' in caplog.text


def test_nan_in_the_optimizer_state_is_refused(run_copy):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    checkpoint = load_checkpoint_file(path)
    moments = next(iter(checkpoint['optimizer']['state'].values()))
    moments['exp_avg_sq'] = moments['exp_avg_sq'].clone().fill_(float('inf'))
    atomic_save(checkpoint, path, checksum=True)
    with pytest.raises(CheckpointError, match='NaN or infinite') as info:
        verify_resume_checkpoint(path)
    assert 'optimizer.state.' in str(info.value) and 'exp_avg_sq' in str(info.value)


def test_pretrained_nan_weights_are_refused_with_exit_2(capfd, run_copy, tmp_path):
    path = os.path.join(run_copy, 'ckpt_epoch_1.pth')
    poison(path, 'encoder.patch_embed.proj.weight')  # one the classifier loads
    code = run(
        main_finetune.main,
        [
            '--cfg',
            TINY,
            '--pretrained',
            path,
            '--output',
            str(tmp_path / 'finetune'),
            '--opts',
            'MODEL.NUM_CLASSES',
            '4',
            'TRAIN.EPOCHS',
            '1',
        ],
        is_pretrain=False,
    )
    captured = capfd.readouterr()
    out = captured.out + captured.err
    assert code == 2 and 'NaN or infinite' in out and path in out, out[-2000:]


def test_eval_refuses_nan_weights_instead_of_printing_a_nan_accuracy(tmp_path):
    config = load_config(
        TINY, ['MODEL.NUM_CLASSES', '4', 'OUTPUT', str(tmp_path)], is_pretrain=False
    )
    os.makedirs(config.OUTPUT)
    torch.manual_seed(0)
    weights = build_model(config, is_pretrain=False).state_dict()
    weights['head.weight'][0, 0] = float('inf')
    atomic_save({'model': weights, 'max_accuracy': 50.0}, f'{config.OUTPUT}/model_best.pth')
    with pytest.raises(CheckpointError, match='NaN or infinite') as info:
        load_eval_weights(config, build_model(config, is_pretrain=False), LOGGER)
    assert 'head.weight' in str(info.value)


# ----------------------------------------------------------------------------- world sizes
def consumed(dataset_len, world_size, per_rank, epoch=3, start_sample=0):
    """The dataset indices `world_size` ranks train in `epoch` from global position
    `start_sample` on, each taking its first `per_rank` samples (None: all it is dealt)."""
    taken = []
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(dataset_len, world_size, rank, True, seed=7)
        sampler.set_epoch(epoch, start_sample=start_sample)
        indices = [index for _, index in sampler]
        taken += indices if per_rank is None else indices[:per_rank]
    return taken


@pytest.mark.parametrize(
    'before, after, batch, steps',
    [(2, 1, 4, 3), (1, 2, 4, 2), (2, 4, 4, 1), (4, 2, 2, 3), (3, 2, 2, 2)],
)
def test_a_resume_on_another_world_size_trains_each_remaining_sample_once(
    before, after, batch, steps
):
    """`steps` steps of `batch` per rank on `before` ranks, then the rest of the epoch on `after`
    ranks from the recorded global position: every sample exactly once (the epoch's 64 samples
    divide by every world size here, so there is no padding and nothing dropped)."""
    first = consumed(64, before, steps * batch)
    rest = consumed(64, after, None, start_sample=steps * batch * before)
    assert sorted(first + rest) == list(range(64))


def test_a_resumed_epoch_that_does_not_divide_repeats_only_padding():
    """50 samples on 4 ranks (padded to 52), resumed on 3 ranks after 40 positions: the 10
    untrained samples are all trained, and only 2 samples twice (the 2 padding an uninterrupted
    4-rank epoch repeats too)."""
    first = consumed(50, 4, 10)
    rest = consumed(50, 3, None, start_sample=40)
    assert len(set(first)) == 40 and set(first) | set(rest) == set(range(50))
    assert len(first + rest) - len(set(first + rest)) == 2 == len(consumed(50, 4, None)) - 50


def test_weights_that_went_non_finite_are_never_written_as_the_newest_checkpoint(tmp_path):
    config = load_config(TINY, ['OUTPUT', str(tmp_path)])
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    state = TrainingState(model, optimizer, build_scheduler(config, optimizer, 6))
    policy = CheckpointPolicy(config, state, ONE_PROCESS, LOGGER)
    good = policy.save((1, 0, 0), epoch_checkpoint_path(str(tmp_path), 0))
    with torch.no_grad():
        model.encoder.patch_embed.proj.weight[0, 0, 0, 0] = float('nan')
    with pytest.raises(NonFiniteLossError) as info:
        policy.save((2, 0, 0), epoch_checkpoint_path(str(tmp_path), 1))
    assert 'encoder.patch_embed.proj.weight' in str(info.value) and good in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_0.pth', 'ckpt_epoch_0.pth.checksum']
    assert policy.last_checkpoint == good
