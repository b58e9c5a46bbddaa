"""checkpoint/sharded.py in one process (DCP without a process group): the round trip, the
directory-level atomicity, safe loading, keep-K over both layouts and the conversion tool.
Two-process sharding and resharding are in tests/test_sharding_e2e.py."""

import errno
import logging
import os
import pickle
import shutil

import pytest
import torch

from checkpoint import sharded
from checkpoint.layout import (
    TrainingState,
    build_checkpoint,
    capture_rng_state,
    progress_state,
    prune_step_checkpoints,
    verify_checkpoint,
)
from checkpoint.resume import find_resume_checkpoint, resume_training, verify_resume_checkpoint
from config import load_config
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from tests.conftest import ROOT
from tools import convert_checkpoint
from utils.distributed import DistInfo
from utils.errors import CheckpointError, CheckpointWriteError
from utils.safe_load import load_checkpoint_file

TINY_V2 = os.path.join(ROOT, 'tests', 'configs', 'tiny_swinv2_pretrain.yaml')
ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'))
LOGGER = logging.getLogger('test')


def trained(seed=0, opts=()):
    """(config, model, optimizer, lr_scheduler) of the tiny SwinV2 after two optimizer steps."""
    config = load_config(TINY_V2, list(opts))
    torch.manual_seed(seed)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, 6)
    for step in range(2):
        images, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 16, 16) < 0.6).long()
        model(images, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step_update(step)
    return config, model, optimizer, scheduler


def save(path, config, model, optimizer, scheduler, position=(1, 2)):
    progress = progress_state(
        config,
        TrainingState(model, optimizer, scheduler, global_update=2),
        position,
        [capture_rng_state()],
    )
    sharded.save_sharded_checkpoint(path, model, optimizer, progress, ONE_PROCESS)
    return path


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """A sharded checkpoint of the trained tiny model, and the single-file dict of the same
    state."""
    config, model, optimizer, scheduler = trained()
    path = save(
        str(tmp_path_factory.mktemp('sharded') / 'ckpt_epoch_0_step_2'),
        config,
        model,
        optimizer,
        scheduler,
    )
    single = build_checkpoint(
        config,
        TrainingState(model, optimizer, scheduler, global_update=2),
        (1, 2),
        [capture_rng_state()],
    )
    return path, single


def assert_equal_trees(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_trees(a[key], b[key])
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and all(
            assert_equal_trees(x, y) is None for x, y in zip(a, b, strict=True)
        )
    else:
        assert a == b


def test_directory_holds_shards_progress_and_the_marker(saved):
    path, _ = saved
    assert sorted(os.listdir(path)) == ['.metadata', 'COMPLETE', '__0_0.distcp', 'progress.pth']
    assert not os.path.exists(path + '.tmp')
    progress = load_checkpoint_file(os.path.join(path, 'progress.pth'))
    assert progress['position'] == {'epoch': 1, 'step': 2} and 'model' not in progress


def test_conversion_gives_the_single_file_checkpoint_of_the_same_state(saved, tmp_path):
    path, single = saved
    out = str(tmp_path / 'converted.pth')
    assert convert_checkpoint.main([path, out]) == 0
    converted = load_checkpoint_file(out)
    assert list(converted) == list(single)
    single = {k: v for k, v in single.items() if k != 'rng_states'}  # captured at another moment
    assert_equal_trees({k: converted[k] for k in single}, single)
    verify_checkpoint(out)  # a resumable single file
    assert convert_checkpoint.main([path, out, '--model-only']) == 0
    assert 'optimizer' not in load_checkpoint_file(out)


def test_resume_restores_model_optimizer_and_schedule_exactly(saved):
    path, single = saved
    config, model, optimizer, scheduler = trained(seed=1)  # other weights, other state
    checkpoint = verify_resume_checkpoint(path)
    state = TrainingState(model, optimizer, scheduler)
    epoch, step = resume_training(path, checkpoint, state, config, LOGGER)
    assert (epoch, step, state.counters()) == (1, 2, {'global_update': 2, 'skipped_total': 0})
    assert_equal_trees(model.state_dict(), single['model'])
    assert_equal_trees(optimizer.state_dict(), single['optimizer'])
    # The schedule comes from the config (the position from the returned epoch and step); the
    # checkpoint's is compared with it, so a changed schedule is reported, not silently taken.
    assert checkpoint['lr_scheduler']['settings'] == single['lr_scheduler']['settings']
    assert scheduler.load_state_dict(checkpoint['lr_scheduler']) == []
    longer = build_scheduler(load_config(TINY_V2, ['TRAIN.EPOCHS', '4']), optimizer, 6)
    assert any(
        line.startswith('num_steps:') for line in longer.load_state_dict(single['lr_scheduler'])
    )


def test_a_single_file_loads_through_the_same_path(saved):
    _, single = saved
    _, model, optimizer, scheduler = trained(seed=1)
    sharded.load_distributed_state('ckpt.pth', single, TrainingState(model, optimizer, scheduler))
    assert_equal_trees(model.state_dict(), single['model'])
    assert_equal_trees(optimizer.state_dict(), single['optimizer'])


def test_checkpoint_of_another_size_names_the_mismatch(saved):
    path, _ = saved
    config, model, optimizer, scheduler = trained(opts=['MODEL.SWINV2.EMBED_DIM', '8'])
    with pytest.raises(CheckpointError, match='does not fit the model.*shape mismatches'):
        resume_training(
            path,
            verify_resume_checkpoint(path),
            TrainingState(model, optimizer, scheduler),
            config,
            LOGGER,
        )


def test_auto_resume_skips_a_directory_without_marker_and_ignores_tmp(saved, tmp_path, caplog):
    path, _ = saved
    # The saved checkpoint continues at epoch 1, step 2; the names order the candidates.
    older = shutil.copytree(path, str(tmp_path / 'ckpt_epoch_1_step_2'))
    unfinished = shutil.copytree(path, str(tmp_path / 'ckpt_epoch_1_step_3'))
    os.remove(os.path.join(unfinished, 'COMPLETE'))
    shutil.copytree(path, str(tmp_path / 'ckpt_epoch_1_step_4.tmp'))  # complete, never renamed
    with caplog.at_level(logging.WARNING, logger='test'):
        found, checkpoint = find_resume_checkpoint(str(tmp_path), LOGGER)
    assert found == older and checkpoint['position'] == {'epoch': 1, 'step': 2}
    assert f'skipping {unfinished}' in caplog.text and 'no COMPLETE marker' in caplog.text


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_tmp(
    saved, tmp_path, monkeypatch
):
    path, _ = saved
    target = shutil.copytree(path, str(tmp_path / 'ckpt_epoch_0'))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(sharded.dcp, 'save', disk_full)
    config, model, optimizer, scheduler = trained()
    with pytest.raises(CheckpointWriteError, match='the disk is full.*intact'):
        save(target, config, model, optimizer, scheduler, position=(5, 0))
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_0']
    assert sharded.verify_sharded_checkpoint(target)['position'] == {'epoch': 1, 'step': 2}


def test_metadata_with_a_foreign_pickled_object_is_refused_without_running_it(saved, tmp_path):
    path = shutil.copytree(saved[0], str(tmp_path / 'ckpt_epoch_0'))

    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / 'ran'),))

    with open(os.path.join(path, '.metadata'), 'wb') as f:
        pickle.dump(RunsCode(), f)
    with pytest.raises(CheckpointError, match='Refused to load.*posix.mkdir'):
        sharded.verify_sharded_checkpoint(path)
    assert not os.path.exists(tmp_path / 'ran')


def test_keep_k_counts_step_checkpoints_of_both_layouts(tmp_path):
    for epoch, step in [(0, 2), (0, 4), (1, 2)]:
        os.makedirs(tmp_path / f'ckpt_epoch_{epoch}_step_{step}')
    for epoch, step in [(0, 6), (1, 4)]:
        torch.save({}, tmp_path / f'ckpt_epoch_{epoch}_step_{step}.pth')
    (tmp_path / 'ckpt_epoch_0.pth').write_bytes(b'')
    prune_step_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        'ckpt_epoch_0.pth',
        'ckpt_epoch_1_step_2',
        'ckpt_epoch_1_step_4.pth',
    ]


def test_optimizer_state_by_name_and_by_index_are_inverse(saved):
    _, single = saved
    by_name = sharded.optimizer_state_by_name(single['optimizer'])
    assert 'encoder.patch_embed.proj.weight' in by_name['state']
    assert_equal_trees(sharded.optimizer_state_by_index(by_name), single['optimizer'])


def test_an_interrupted_directory_is_named_incomplete_wherever_it_is_given(saved, tmp_path):
    path, _ = saved
    unfinished = shutil.copytree(path, str(tmp_path / 'ckpt_epoch_1'))
    os.remove(os.path.join(unfinished, 'COMPLETE'))
    for read in (sharded.verify_sharded_checkpoint, sharded.read_checkpoint):
        with pytest.raises(
            CheckpointError, match='is an incomplete sharded checkpoint: it has no COMPLETE marker'
        ):
            read(unfinished)
