"""checkpoint/optimizer_state.py: optimizer states matched by parameter name, so that a run started
with the official code (its [decay, no_decay] groups and no-decay membership, pickled yacs config,
apex 'amp' state) continues here with --resume; a state of another model is one clear paragraph."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from yacs.config import CfgNode

from checkpoint.layout import TrainingState
from checkpoint.resume import resume_training
from config import load_config
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from tests.conftest import ROOT
from utils.errors import CheckpointError
from utils.safe_load import load_checkpoint_file

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')  # 48 images, batch 8
LOGGER = logging.getLogger('test_official_checkpoint')
OFFICIAL_STEPS = 3


def official_pretrain_groups(model):
    """The official get_pretrain_param_groups for a Swin SimMIM model, written out: [decay,
    no_decay], no decay for 1-D tensors, biases and the exact names encoder.absolute_pos_embed /
    encoder.mask_token. Its keyword 'encoder.relative_position_bias_table' matches no name, so the
    position tables are decayed (Swin-Transformer #369)."""
    skip = ('encoder.absolute_pos_embed', 'encoder.mask_token')
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        no = param.ndim == 1 or name.endswith('.bias') or name in skip
        (no_decay if no else decay).append((name, param))
    return decay, no_decay


def official_config():
    """The kind of yacs CfgNode the official code pickles into every checkpoint."""
    return CfgNode(
        {
            'MODEL': CfgNode({'TYPE': 'swin', 'NAME': 'simmim_pretrain'}),
            'TRAIN': CfgNode({'EPOCHS': 2, 'BASE_LR': 8e-3}),
            'AMP_OPT_LEVEL': 'O1',
        }
    )


def write_official_checkpoint(path):
    """Train the tiny Swin for OFFICIAL_STEPS AdamW steps in the official group order and save what
    the official save_checkpoint saves, with the Python-int Adam steps of torch < 1.12 (the
    official code's era). Returns {param name: optimizer state}."""
    config = load_config(TINY, is_pretrain=True)
    torch.manual_seed(0)
    model = build_model(config, is_pretrain=True)
    decay, no_decay = official_pretrain_groups(model)
    assert any('relative_position_bias_table' in n for n, _ in decay)  # the official bug
    optimizer = torch.optim.AdamW(
        [
            {'params': [p for _, p in decay]},
            {'params': [p for _, p in no_decay], 'weight_decay': 0.0},
        ],
        lr=1e-3,
        weight_decay=0.05,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(OFFICIAL_STEPS):
        images = torch.randn(2, 3, 64, 64, generator=gen)
        mask = (torch.rand(2, 16, 16, generator=gen) < 0.6).long()
        model(images, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    for key in [k for k in state if k.endswith('relative_position_bias_table')]:
        side = int(state[key].shape[0] ** 0.5 + 1) // 2  # (2w-1)^2 rows -> window w
        index = key.replace('_bias_table', '_index')  # a persistent buffer in the official code
        state[index] = torch.zeros(side**2, side**2, dtype=torch.long)
    optimizer_state = optimizer.state_dict()
    for entry in optimizer_state['state'].values():
        entry['step'] = int(entry['step'])
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=12,
        lr_min=1e-5,
        warmup_t=6,
        warmup_lr_init=1e-6,
        cycle_limit=1,
        t_in_epochs=False,
    )
    torch.save(
        {
            'model': state,
            'optimizer': optimizer_state,
            'lr_scheduler': scheduler.state_dict(),
            'max_accuracy': 0.0,
            'epoch': 0,
            'config': official_config(),
            'amp': {'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': OFFICIAL_STEPS}},
        },
        path,
    )
    return {name: optimizer.state[p] for name, p in decay + no_decay}


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """(path of an official-layout pre-training checkpoint, {param name: optimizer state})."""
    path = str(tmp_path_factory.mktemp('official') / 'ckpt_epoch_0.pth')
    return path, write_official_checkpoint(path)


def our_run(config):
    torch.manual_seed(1)
    model = build_model(config, is_pretrain=True)
    optimizer = build_optimizer(config, model, is_pretrain=True)
    return model, optimizer, build_scheduler(config, optimizer, 6)


def test_official_pretraining_state_is_loaded_by_parameter(official):
    path, official = official
    config = load_config(TINY, is_pretrain=True)
    model, optimizer, scheduler = our_run(config)
    position = resume_training(
        path, load_checkpoint_file(path), TrainingState(model, optimizer, scheduler), config, LOGGER
    )
    assert position[:2] == (1, 0)  # official epoch 0 done -> continue at epoch 1
    assert optimizer.param_groups[0]['group_name'] != 'decay'  # ours start with no_decay here
    for group in optimizer.param_groups:
        for name, param in zip(group['param_names'], group['params'], strict=True):
            state = optimizer.state[param]
            assert float(state['step']) == OFFICIAL_STEPS
            torch.testing.assert_close(state['exp_avg'], official[name]['exp_avg'], rtol=0, atol=0)
            torch.testing.assert_close(
                state['exp_avg_sq'], official[name]['exp_avg_sq'], rtol=0, atol=0
            )
            if 'relative_position_bias_table' in name:
                assert group['weight_decay'] == 0.0  # our rule, not the checkpoint's 0.05


def test_official_state_loads_alike_through_the_fsdp_path(official):
    # The loader of sharded runs (any layout, any world size: set_state_dict by parameter name)
    # must give what the tested single-process path above gives.
    from checkpoint.sharded import load_distributed_state

    config = load_config(TINY, is_pretrain=True)
    reference, ref_optimizer, ref_scheduler = our_run(config)
    expected = resume_training(
        official[0],
        load_checkpoint_file(official[0]),
        TrainingState(reference, ref_optimizer, ref_scheduler),
        config,
        LOGGER,
    )
    model, optimizer, scheduler = our_run(config)
    load_distributed_state(
        official[0],
        load_checkpoint_file(official[0]),
        TrainingState(model, optimizer, scheduler),
        config,
        LOGGER,
    )
    assert expected == (1, 0)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    for ref_group, group in zip(ref_optimizer.param_groups, optimizer.param_groups, strict=True):
        assert group['param_names'] == ref_group['param_names']
        assert group['weight_decay'] == ref_group['weight_decay']
        for ref_param, param in zip(ref_group['params'], group['params'], strict=True):
            for key, value in ref_optimizer.state[ref_param].items():
                torch.testing.assert_close(optimizer.state[param][key], value, rtol=0, atol=0)


def test_official_state_of_another_layout_is_one_clear_paragraph(official):
    from checkpoint.optimizer_state import load_optimizer_state

    checkpoint = load_checkpoint_file(official[0])
    groups = checkpoint['optimizer']['param_groups']
    groups[1]['params'].append(groups[0]['params'].pop())  # e.g. another no-decay rule or model
    config = load_config(TINY, is_pretrain=True)
    model, optimizer, _ = our_run(config)
    with pytest.raises(CheckpointError) as info:
        load_optimizer_state(optimizer, checkpoint, model, config, LOGGER)
    message = str(info.value)
    assert 'cannot be matched' in message and '(name, size)' in message
    assert '--pretrained' in message
    assert '\n' not in message


def test_our_state_with_other_groups_is_matched_by_name():
    # A run that changes TRAIN.WEIGHT_DECAY_RULES (or LAYER_DECAY) between resumes.
    from checkpoint.optimizer_state import load_optimizer_state

    config = load_config(TINY, ['TRAIN.WEIGHT_DECAY_RULES', 'official'], is_pretrain=True)
    torch.manual_seed(0)
    model = build_model(config, is_pretrain=True)
    before = build_optimizer(config, model, is_pretrain=True)
    model(torch.randn(2, 3, 64, 64), torch.ones(2, 16, 16, dtype=torch.long)).backward()
    before.step()
    ours = load_config(TINY, is_pretrain=True)
    after = build_optimizer(ours, model, is_pretrain=True)
    assert [len(g['params']) for g in after.param_groups] != [
        len(g['params']) for g in before.param_groups
    ]
    load_optimizer_state(after, {'optimizer': before.state_dict()}, model, ours, LOGGER)
    for param in model.parameters():
        torch.testing.assert_close(after.state[param]['exp_avg'], before.state[param]['exp_avg'])


def _main_simmim(*args):
    # The real script in its own process, as a user runs it.
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'main_simmim.py'), '--cfg', TINY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )


@pytest.mark.slow
def test_official_pretraining_checkpoint_resumes_in_main_simmim_and_trains_on(tmp_path, official):
    result = _main_simmim(
        '--output',
        str(tmp_path / 'out'),
        '--resume',
        official[0],
        '--opts',
        'TRAIN.EPOCHS',
        '2',
        'DATA.SYNTHETIC.TRAIN_SIZE',
        '16',
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    run_dir = os.path.join(str(tmp_path / 'out'), 'simmim_pretrain', 'tiny')
    log = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert 'continuing at epoch 1, step 0' in log and 'by parameter name' in log
    assert "apex AMP state ('amp'" in log
    saved = load_checkpoint_file(os.path.join(run_dir, 'ckpt_epoch_1.pth'))['optimizer']['state']
    # 16 images / batch 8 = 2 more steps on top of the official 3: the state was carried on.
    assert {float(entry['step']) for entry in saved.values()} == {OFFICIAL_STEPS + 2.0}
