"""utils/tasks.py: pre-training and fine-tuning as data, and the official `is_pretrain` spelling of
the public builders (build_model, build_loader, build_optimizer, get_config/load_config, run)."""

import logging
import os

import pytest

from config import get_defaults, load_config
from models import SimMIM, build_model
from optimizer import build_optimizer, build_param_groups
from tests.conftest import ROOT
from utils.arguments import build_arg_parser
from utils.errors import ConfigError
from utils.tasks import FINETUNE, PRETRAIN, Task, as_task

SWIN_800 = os.path.join(
    ROOT, 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'
)


def tiny_swin(layer_decay=1.0):
    config = get_defaults()
    config.DATA.IMG_SIZE = 32
    config.MODEL.NUM_CLASSES = 3
    config.MODEL.SWIN.update(
        EMBED_DIM=8, DEPTHS=[1, 1], NUM_HEADS=[1, 2], WINDOW_SIZE=4, PATCH_SIZE=2
    )
    config.TRAIN.LAYER_DECAY = layer_decay
    return config


def test_the_two_tasks_differ_in_what_the_shared_code_asks():
    assert PRETRAIN.masked_image_modeling and not FINETUNE.masked_image_modeling
    assert FINETUNE.layer_decay and not PRETRAIN.layer_decay
    assert FINETUNE.finetune_flags and not PRETRAIN.finetune_flags
    parser = build_arg_parser(finetune=FINETUNE.finetune_flags)
    assert (
        parser.parse_args(['--cfg', 'x', '--pretrained', 'p.pth', '--eval']).pretrained == 'p.pth'
    )


@pytest.mark.parametrize(
    'args, expected',
    [
        ((), PRETRAIN),
        ((None,), PRETRAIN),
        ((True,), PRETRAIN),
        ((False,), FINETUNE),
        (('finetune',), FINETUNE),
        ((FINETUNE,), FINETUNE),
        ((PRETRAIN, False), FINETUNE),
    ],
)
def test_as_task_reads_tasks_names_and_the_official_flag(args, expected):
    assert as_task(*args) is expected


def test_as_task_rejects_what_is_not_a_task():
    with pytest.raises(ValueError, match="task 'linear_probe' is not one of the valid tasks"):
        as_task('linear_probe')
    assert isinstance(as_task(Task('probe', 'probing', False, False, True)), Task)


def test_build_model_official_flag_and_task_agree():
    config = tiny_swin()
    assert isinstance(build_model(config), SimMIM)
    assert isinstance(build_model(config, PRETRAIN), SimMIM)
    for finetune in (
        build_model(config, is_pretrain=False),
        build_model(config, False),
        build_model(config, FINETUNE),
    ):
        assert not isinstance(finetune, SimMIM) and finetune.head.out_features == 3


def test_layer_decay_follows_the_task_and_the_official_positional_flag(caplog):
    config = tiny_swin(layer_decay=0.5)
    model = build_model(config, FINETUNE)

    def names(groups):
        return sorted(g['group_name'] for g in groups)

    by_task = names(build_optimizer(config, model, None, FINETUNE).param_groups)
    assert by_task == names(build_optimizer(config, model, None, False).param_groups)
    assert by_task == names(build_param_groups(config, model, is_pretrain=False))
    assert len(by_task) > 2 and 'layer_0_decay' in by_task
    with caplog.at_level(logging.WARNING):
        pretrain_groups = build_optimizer(config, model, logging.getLogger('t'), PRETRAIN)
    assert names(pretrain_groups.param_groups) == ['decay', 'no_decay']
    assert 'TRAIN.LAYER_DECAY 0.5 is ignored in pre-training' in caplog.text


def test_the_task_decides_which_config_sections_are_checked():
    bad_mask = ['DATA.IMG_SIZE', 224, 'MODEL.SWIN.WINDOW_SIZE', 7, 'DATA.MASK_PATCH_SIZE', 48]
    with pytest.raises(ConfigError, match='not divisible by DATA.MASK_PATCH_SIZE 48'):
        load_config(SWIN_800, bad_mask, PRETRAIN)
    assert load_config(SWIN_800, bad_mask, FINETUNE).DATA.MASK_PATCH_SIZE == 48
    assert load_config(SWIN_800, bad_mask, is_pretrain=False).DATA.MASK_PATCH_SIZE == 48
