"""main_finetune.py --eval: which checkpoint it evaluates, and that a checkpoint which does not hold
every tensor of the model is refused (never evaluated on initial weights)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import main_finetune
from config import load_config
from engine.evaluation import load_eval_weights
from engine.launch import run
from models import build_model
from tests.conftest import ROOT

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')
LOGGER = logging.getLogger('test_main_finetune')
TINY_SWINV2 = [
    'MODEL.TYPE',
    'swinv2',
    'MODEL.SWINV2.EMBED_DIM',
    '16',
    'MODEL.SWINV2.DEPTHS',
    '[1,1,1,1]',
    'MODEL.SWINV2.NUM_HEADS',
    '[1,1,2,2]',
    'MODEL.SWINV2.WINDOW_SIZE',
    '4',
    'MODEL.NUM_CLASSES',
    '4',
]


def classifier(config, seed):
    torch.manual_seed(seed)
    return build_model(config, is_pretrain=False)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_eval_loads_a_released_swinv2_file_with_ddp_prefix_and_rebuilt_buffers(tmp_path):
    # Released SwinV2 files name the position MLP rpe_mlp (Swin-Transformer #271); this one was
    # also saved from the DDP wrapper with the official persistent index buffers.
    path = str(tmp_path / 'released.pth')
    config = load_config(
        TINY, [*TINY_SWINV2, 'OUTPUT', str(tmp_path), 'MODEL.RESUME', path], is_pretrain=False
    )
    trained = classifier(config, seed=0).state_dict()
    assert any('cpb_mlp' in k for k in trained)
    released = {'module.' + k.replace('cpb_mlp', 'rpe_mlp'): v for k, v in trained.items()}
    released['module.layers.0.blocks.0.attn.relative_coords_table'] = torch.zeros(1, 7, 7, 2)
    released['module.layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(16, 16).long()
    torch.save({'model': released, 'epoch': 99}, path)

    model = classifier(config, seed=1)
    load_eval_weights(config, model, LOGGER)
    assert_same_state(model.state_dict(), trained)


def _resumable(model, epoch):
    return {'model': model.state_dict(), 'optimizer': {}, 'lr_scheduler': {}, 'epoch': epoch}


def test_eval_without_resume_takes_model_best_else_the_newest_checkpoint(tmp_path):
    config = load_config(
        TINY, ['MODEL.NUM_CLASSES', '4', 'OUTPUT', str(tmp_path)], is_pretrain=False
    )
    out = config.OUTPUT
    os.makedirs(out)
    older, newer, best = (classifier(config, seed) for seed in (1, 2, 3))
    torch.save(_resumable(older, 0), os.path.join(out, 'ckpt_epoch_0.pth'))
    torch.save(_resumable(newer, 1), os.path.join(out, 'ckpt_epoch_1.pth'))
    os.utime(os.path.join(out, 'ckpt_epoch_0.pth'), (1, 1))

    model = classifier(config, seed=0)
    load_eval_weights(config, model, LOGGER)
    assert_same_state(model.state_dict(), newer.state_dict())

    torch.save({'model': best.state_dict(), 'accuracy': 50.0}, os.path.join(out, 'model_best.pth'))
    load_eval_weights(config, model, LOGGER)
    assert_same_state(model.state_dict(), best.state_dict())


@pytest.mark.slow
def test_eval_of_a_pretraining_checkpoint_is_refused_with_the_pretrained_hint(tmp_path):
    torch.manual_seed(0)
    pretraining = build_model(load_config(TINY, is_pretrain=True), is_pretrain=True)
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    torch.save({'model': pretraining.state_dict()}, path)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'main_finetune.py'),
            '--cfg',
            TINY,
            '--output',
            str(tmp_path / 'out'),
            '--eval',
            '--resume',
            path,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]  # wrong input (utils/errors.py)
    assert 'Traceback' not in output and 'Accuracy of the network' not in output
    assert 'does not fit the model' in output
    assert 'missing: ' in output and 'head.*' in output  # named model tensors it lacks
    assert 'unexpected: ' in output and 'decoder.*' in output  # and tensors the model lacks
    assert 'pass it with --pretrained' in output


@pytest.mark.slow
def test_eval_with_throughput_does_both(tmp_path, capsys):
    config = load_config(TINY, ['MODEL.NUM_CLASSES', '4'], is_pretrain=False)
    path = str(tmp_path / 'finetuned.pth')
    torch.save({'model': classifier(config, seed=0).state_dict()}, path)
    argv = ['--cfg', TINY, '--output', str(tmp_path / 'out'), '--eval', '--throughput']
    argv += ['--resume', path, '--opts', 'MODEL.NUM_CLASSES', '4']
    assert run(main_finetune.main, argv, is_pretrain=False) == 0
    out = capsys.readouterr().out
    assert 'Accuracy of the network on the 24 test images' in out  # --eval
    assert 'throughput averaged with 30 times' in out  # and --throughput, no longer ignored
