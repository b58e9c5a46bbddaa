"""config.py: official YAMLs load, inheritance, overrides, flags, validation messages."""

import glob
import math
import os

import pytest
import torch
from yacs.config import CfgNode

from config import (
    NUMERIC_RANGES,
    UNCONSTRAINED_NUMERIC_KEYS,
    check_common_keys,
    get_config,
    get_defaults,
    load_config,
    load_config_text,
)
from engine.precision import autocast_dtype, describe_autocast
from tests.conftest import ROOT
from utils.arguments import build_arg_parser
from utils.errors import ConfigError

SWIN_800 = os.path.join(
    ROOT, 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'
)
ALL_YAMLS = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True))


@pytest.mark.parametrize('path', ALL_YAMLS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_yaml_loads(path):
    is_pretrain = 'finetune' not in os.path.basename(path) and 'linprobe' not in os.path.basename(
        path
    )
    config = load_config(path, is_pretrain=is_pretrain)
    assert config.is_frozen()


def test_official_swin_base_800ep_values():
    config = load_config(SWIN_800, opts=['DATA.BATCH_SIZE', 128])
    assert config.MODEL.SWIN.DEPTHS == [2, 2, 18, 2] and config.MODEL.SWIN.WINDOW_SIZE == 6
    assert (
        config.TRAIN.LR_SCHEDULER.NAME == 'multistep'
        and config.TRAIN.LR_SCHEDULER.MULTISTEPS == [700]
    )
    # YAML reads "1e-4" as a string; it must become the float, then be scaled by 128 * 1 / 512.
    assert config.TRAIN.BASE_LR == pytest.approx(1e-4 * 128 / 512)
    assert config.TRAIN.WARMUP_LR == pytest.approx(5e-7 * 128 / 512)
    assert config.OUTPUT == os.path.join(
        'output', 'simmim_pretrain', 'simmim_pretrain__swin_base__img192_window6__800ep'
    )


def _derived(config):
    return (config.OUTPUT, config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR)


def test_a_stored_config_reads_back_as_itself(tmp_path):
    # A run's config (what checkpoints and OUTPUT/config.yaml store) has OUTPUT joined with NAME
    # and TAG and the learning rates scaled to the batch; reading it again must not do either a
    # second time (it used to: OUTPUT/NAME/TAG/NAME/TAG, BASE_LR x 128/512 twice).
    config = load_config(SWIN_800, opts=['DATA.BATCH_SIZE', 128])
    expected = (
        os.path.join(
            'output', 'simmim_pretrain', 'simmim_pretrain__swin_base__img192_window6__800ep'
        ),
        1e-4 * 128 / 512,
        5e-7 * 128 / 512,
        5e-6 * 128 / 512,
    )
    assert _derived(config)[0] == expected[0]
    assert _derived(config)[1:] == pytest.approx(expected[1:])
    again = load_config_text(config.dump(), is_pretrain=True)
    assert again.dump() == config.dump()
    path = tmp_path / 'config.yaml'
    path.write_text(config.dump())
    from_file = load_config(str(path), opts=['PRINT_FREQ', '5'])  # e.g. --cfg OUTPUT/config.yaml
    assert _derived(from_file) == _derived(config) and from_file.PRINT_FREQ == 5
    assert load_config_text(from_file.dump()).dump() == from_file.dump()


def test_lr_scaling_uses_world_size_and_accumulation(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '16')
    config = load_config(SWIN_800, opts=['DATA.BATCH_SIZE', 128, 'TRAIN.ACCUMULATION_STEPS', 2])
    assert config.TRAIN.BASE_LR == pytest.approx(1e-4 * 128 * 16 / 512 * 2)


def test_base_inheritance_relative_to_yaml_and_override_order(tmp_path):
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'base.yaml').write_text('DATA:\n  IMG_SIZE: 96\n  MASK_PATCH_SIZE: 16\nTAG: base\n')
    (tmp_path / 'sub' / 'child.yaml').write_text(
        "BASE: ['../base.yaml']\nTAG: child\nMODEL:\n  TYPE: vit\n"
    )
    config = load_config(
        str(tmp_path / 'sub' / 'child.yaml'),
        opts=['TRAIN.EPOCHS', '3'],
        output=str(tmp_path / 'out'),
        tag='flag',
    )
    assert config.DATA.IMG_SIZE == 96 and config.MODEL.TYPE == 'vit'
    assert config.TRAIN.EPOCHS == 3
    assert config.TAG == 'flag'  # a flag beats the YAML
    assert config.OUTPUT == os.path.join(str(tmp_path / 'out'), config.MODEL.NAME, 'flag')


def test_command_line_flags_map_to_keys(monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '3')
    args = build_arg_parser(finetune=True).parse_args(
        [
            '--cfg',
            SWIN_800,
            '--batch-size',
            '8',
            '--data-path',
            '/data',
            '--resume',
            'r.pth',
            '--accumulation-steps',
            '4',
            '--use-checkpoint',
            '--amp-opt-level',
            'O0',
            '--tag',
            't',
            '--pretrained',
            'p.pth',
            '--throughput',
            '--local_rank',
            '1',
        ]
    )
    config = get_config(args, is_pretrain=False)
    assert (config.DATA.BATCH_SIZE, config.DATA.DATA_PATH, config.MODEL.RESUME) == (
        8,
        '/data',
        'r.pth',
    )
    assert config.TRAIN.ACCUMULATION_STEPS == 4 and config.TRAIN.USE_CHECKPOINT
    assert config.AMP_OPT_LEVEL == 'O0' and not config.ENABLE_AMP
    assert config.MODEL.PRETRAINED == 'p.pth' and config.THROUGHPUT_MODE
    assert config.LOCAL_RANK == 3  # torchrun's environment wins over the flag
    args = build_arg_parser(finetune=True).parse_args(['--cfg', SWIN_800, '--eval'])
    assert get_config(args, is_pretrain=False).EVAL_MODE


def test_a_batch_size_of_zero_is_rejected_not_ignored():
    args = build_arg_parser().parse_args(['--cfg', SWIN_800, '--batch-size', '0'])
    with pytest.raises(ConfigError, match='DATA.BATCH_SIZE must be positive, got 0'):
        get_config(args)


def test_repeated_opts_groups_all_apply_in_order():
    args = build_arg_parser().parse_args(
        [
            '--cfg',
            SWIN_800,
            '--opts',
            'TRAIN.EPOCHS',
            '3',
            'SEED',
            '1',
            '--opts',
            'PRINT_FREQ',
            '7',
            'SEED',
            '2',
        ]
    )
    config = get_config(args)
    assert (config.TRAIN.EPOCHS, config.PRINT_FREQ, config.SEED) == (3, 7, 2)


def test_base_given_as_one_string(tmp_path):
    (tmp_path / 'base.yaml').write_text('DATA:\n  MASK_PATCH_SIZE: 16\nTAG: base\n')
    (tmp_path / 'child.yaml').write_text('BASE: base.yaml\nTRAIN:\n  EPOCHS: 3\n')
    config = load_config(str(tmp_path / 'child.yaml'))
    assert config.DATA.MASK_PATCH_SIZE == 16 and config.TAG == 'base' and config.TRAIN.EPOCHS == 3


def test_local_rank_flag_spellings():
    parser = build_arg_parser()
    assert parser.parse_args(['--cfg', 'x', '--local-rank', '2']).local_rank == 2
    assert parser.parse_args(['--cfg', 'x', '--local_rank=5']).local_rank == 5


def test_mistyped_flag_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(['--cfg', 'x', '--bach-size', '8'])
    assert 'did you mean --batch-size' in capsys.readouterr().err


def test_legacy_top_level_pretrained_key(tmp_path):
    path = tmp_path / 'ft.yaml'
    path.write_text("PRETRAINED: 'old.pth'\n")
    assert load_config(str(path), is_pretrain=False).MODEL.PRETRAINED == 'old.pth'


@pytest.mark.parametrize(
    'opts, expected',
    [
        (['TRAIN.BASE_LRR', '1e-3'], "Unknown config key 'TRAIN.BASE_LRR'"),
        (['TRAIN.BASE_LRR', '1e-3'], 'Did you mean TRAIN.BASE_LR'),
        (['WINDOW_SIZE', '7'], 'MODEL.SWIN.WINDOW_SIZE'),
        (['TRAIN.EPOCHS', 'ten'], "'TRAIN.EPOCHS'"),
        (['DATA.MASK_RATIO', '1.0'], 'DATA.MASK_RATIO must lie in (0, 1)'),
        (['DATA.MASK_RATIO', '0'], 'DATA.MASK_RATIO must lie in (0, 1)'),
        (['DATA.MASK_PATCH_SIZE', '40'], 'not divisible by DATA.MASK_PATCH_SIZE 40'),
        (
            ['DATA.MASK_PATCH_SIZE', '6', 'DATA.IMG_SIZE', '192'],
            'DATA.MASK_PATCH_SIZE 6 is not divisible by the model patch size 4',
        ),
        (['MODEL.SWIN.WINDOW_SIZE', '7'], 'MODEL.SWIN.WINDOW_SIZE 7 does not fit stage 0'),
        (['DATA.IMG_SIZE', '200'], 'DATA.IMG_SIZE 200 must be divisible by 32'),
        (['MODEL.SWIN.NUM_HEADS', '[4, 8, 16]'], 'same length'),
        (['TRAIN.OPTIMIZER.NAME', 'adam'], 'TRAIN.OPTIMIZER.NAME'),
        (['DATA', '3'], 'is a group'),
    ],
)
def test_bad_values_name_the_key_and_the_fix(opts, expected):
    with pytest.raises(ConfigError) as info:
        load_config(SWIN_800, opts=opts)
    assert expected in str(info.value)


def test_int_accepted_for_float_key_and_odd_opts_rejected():
    assert (
        load_config(SWIN_800, opts=['TRAIN.CLIP_GRAD', '1', 'DATA.BATCH_SIZE', 512]).TRAIN.CLIP_GRAD
        == 1.0
    )
    with pytest.raises(ConfigError, match='KEY VALUE pairs'):
        load_config(SWIN_800, opts=['TRAIN.EPOCHS'])


def test_missing_yaml_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match='Config file not found'):
        load_config(str(tmp_path / 'nope.yaml'))
    (tmp_path / 'a.yaml').write_text("BASE: ['b.yaml']\n")
    (tmp_path / 'b.yaml').write_text("BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match='cycle'):
        load_config(str(tmp_path / 'a.yaml'))


def test_mask_checks_only_for_pretraining():
    # A fine-tuning config never uses the mask keys, so they do not constrain its image size.
    config = load_config(
        SWIN_800,
        opts=['DATA.IMG_SIZE', 224, 'MODEL.SWIN.WINDOW_SIZE', 7, 'DATA.MASK_PATCH_SIZE', 48],
        is_pretrain=False,
    )
    assert config.DATA.IMG_SIZE == 224


# ------------------------------------------------------------------------------------------------
# Numeric ranges (config.NUMERIC_RANGES)
# ------------------------------------------------------------------------------------------------
TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')


def _leaves(node, prefix=''):
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from _leaves(value, f'{prefix}{key}.')
        else:
            yield prefix + key, value


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_keys():
    """Keys whose default is a number, None (a number or off) or a list of numbers."""
    return {
        key
        for key, value in _leaves(get_defaults())
        if value is None
        or _is_number(value)
        or (isinstance(value, (list, tuple)) and all(_is_number(v) for v in value))
    }


def test_every_numeric_key_has_a_range_or_is_listed_as_unconstrained():
    numeric = _numeric_keys()
    assert {'TRAIN.BASE_LR', 'TRAIN.CLIP_GRAD', 'AUG.CUTMIX_MINMAX'} <= numeric  # the walk works
    listed = set(NUMERIC_RANGES) | set(UNCONSTRAINED_NUMERIC_KEYS)
    assert sorted(numeric - listed) == []  # a new key without a range
    assert sorted(listed - numeric) == []  # a range for a key that is gone or not numeric
    assert not set(NUMERIC_RANGES) & set(UNCONSTRAINED_NUMERIC_KEYS)
    check_common_keys(get_defaults())  # the defaults lie in their ranges


def _outside(allowed, default):
    """Values just outside `allowed` (a Range), of the default's element type where it can be."""
    element = default[0] if isinstance(default, (list, tuple)) and default else default
    integer = isinstance(element, int)
    values = [math.nan, math.inf, -math.inf, '0.1']
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - (1 if integer else 1e-3))
    if allowed.high is not None:
        values.append(
            allowed.high if allowed.high_open else allowed.high + (1 if integer else 1e-3)
        )
    if not allowed.none_ok:
        values.append(None)
    return values


@pytest.mark.parametrize('key', sorted(NUMERIC_RANGES))
def test_each_numeric_key_rejects_values_outside_its_range(key):
    allowed = NUMERIC_RANGES[key]
    *parents, leaf = key.split('.')
    for bad in _outside(allowed, dict(_leaves(get_defaults()))[key]):
        config = get_defaults()
        node = config
        for part in parents:
            node = node[part]
        is_list = isinstance(node[leaf], (list, tuple))
        node[leaf] = [bad] if is_list else bad
        with pytest.raises(ConfigError) as info:
            check_common_keys(config)
        message = str(info.value)
        assert message.startswith(('Each value of ' if is_list else '') + f'{key} must ')
        assert f'got {([bad] if is_list else bad)!r}' in message and allowed.describe() in message


@pytest.mark.parametrize(
    'yaml_value, key, expected',
    [
        ('TRAIN:\n  BASE_LR: .nan\n', 'TRAIN.BASE_LR', 'TRAIN.BASE_LR must be >= 0, got nan'),
        ('TRAIN:\n  MIN_LR: .inf\n', 'TRAIN.MIN_LR', 'TRAIN.MIN_LR must be >= 0, got inf'),
        ('TRAIN:\n  WARMUP_LR: -.inf\n', 'TRAIN.WARMUP_LR', 'must be >= 0, got -inf'),
        ('TRAIN:\n  BASE_LR: -1e-3\n', 'TRAIN.BASE_LR', 'must be >= 0, got -0.001'),
        ('TRAIN:\n  BASE_LR: null\n', 'TRAIN.BASE_LR', 'must be >= 0, got None'),
        ('TRAIN:\n  CLIP_GRAD: -1.0\n', 'TRAIN.CLIP_GRAD', '0 or None: no clipping'),
        ('TRAIN:\n  WEIGHT_DECAY: -0.05\n', 'TRAIN.WEIGHT_DECAY', 'must be >= 0, got -0.05'),
        ('TRAIN:\n  LAYER_DECAY: 1.5\n', 'TRAIN.LAYER_DECAY', 'must lie in (0, 1], got 1.5'),
        ('MODEL:\n  DROP_PATH_RATE: 1.0\n', 'MODEL.DROP_PATH_RATE', 'lie in [0, 1), got 1.0'),
        ('AUG:\n  MIXUP: -0.8\n', 'AUG.MIXUP', 'AUG.MIXUP must be >= 0, got -0.8'),
        ('TRAIN:\n  OPTIMIZER:\n    BETAS: [0.9, 1.0]\n', 'BETAS', '[0.9, 1.0] (1.0 is not)'),
        ('TRAIN:\n  BASE_LR: nan\n', 'TRAIN.BASE_LR', "got 'nan' (str)"),  # a string: merge
        ('DATA:\n  NUM_WORKERS: -1\n', 'DATA.NUM_WORKERS', 'must be >= 0, got -1'),
    ],
)
def test_bad_numbers_in_a_yaml_stop_naming_key_value_and_range(tmp_path, yaml_value, key, expected):
    path = tmp_path / 'bad.yaml'
    path.write_text(f'BASE: [{TINY!r}]\n' + yaml_value)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert key in str(info.value) and expected in str(info.value)


def test_bad_numbers_from_opts_stop_too():
    with pytest.raises(ConfigError, match=r'TRAIN.CLIP_GRAD must be >= 0 \(or None\), got -5.0'):
        load_config(TINY, opts=['TRAIN.CLIP_GRAD', '-5'])
    with pytest.raises(ConfigError, match='TRAIN.EPOCHS must be positive, got 0'):
        load_config(TINY, opts=['TRAIN.EPOCHS', '0'])
    with pytest.raises(ConfigError, match='TRAIN.BASE_LR must be >= 0, got inf'):
        load_config(TINY, opts=['TRAIN.BASE_LR', '1e999'])  # overflows to inf
    for off in ('0', 'None'):  # both turn clipping off, and are accepted
        assert load_config(TINY, opts=['TRAIN.CLIP_GRAD', off]).TRAIN.CLIP_GRAD in (0.0, None)


def test_a_warmup_as_long_as_the_run_is_warned_about():
    notes = []
    load_config(TINY, opts=['TRAIN.EPOCHS', '1'], notes=notes)  # WARMUP_EPOCHS 1
    assert [n for n in notes if 'TRAIN.WARMUP_EPOCHS 1 is not shorter than TRAIN.EPOCHS 1' in n]
    notes = []
    load_config(TINY, opts=['TRAIN.EPOCHS', '2'], notes=notes)
    assert notes == []


# ------------------------------------------------------------------------------------------------
# Flags the config would make meaningless
# ------------------------------------------------------------------------------------------------
def test_data_path_with_the_synthetic_set_switches_to_the_folder_and_says_so():
    notes = []
    config = load_config(TINY, data_path='/my/images', notes=notes)  # DATA.DATASET synthetic
    assert (config.DATA.DATASET, config.DATA.DATA_PATH) == ('folder', '/my/images')
    assert len(notes) == 1 and 'DATA.DATASET is now folder' in notes[0]
    notes = []
    config = load_config(SWIN_800, data_path='/my/images', notes=notes)  # imagenet: unchanged
    assert (config.DATA.DATASET, config.DATA.DATA_PATH, notes) == ('imagenet', '/my/images', [])


@pytest.mark.parametrize(
    'flags, expected',
    [
        (['--pretrained', 'p.pth'], 'To evaluate p.pth, pass it with --resume instead'),
        (['--use-checkpoint'], '--use-checkpoint would do nothing'),
        (['--accumulation-steps', '2'], '--accumulation-steps would do nothing'),
    ],
)
def test_eval_refuses_flags_that_only_change_training(flags, expected):
    args = build_arg_parser(finetune=True).parse_args(['--cfg', SWIN_800, '--eval', *flags])
    with pytest.raises(ConfigError, match=expected):
        get_config(args, is_pretrain=False)


def _stored_run_config(tmp_path):
    """A run's OUTPUT/config.yaml: what load_config gives, dumped."""
    config = load_config(TINY, output=str(tmp_path / 'out'))
    path = tmp_path / 'config.yaml'
    path.write_text(config.dump())
    return config, str(path)


def test_a_run_config_with_another_tag_or_output_starts_there_with_the_same_rates(tmp_path):
    run, path = _stored_run_config(tmp_path)
    assert run.OUTPUT == os.path.join(str(tmp_path / 'out'), 'simmim_pretrain', 'tiny')
    lrs = (run.TRAIN.BASE_LR, run.TRAIN.WARMUP_LR, run.TRAIN.MIN_LR)
    assert lrs == pytest.approx((8e-3 * 8 / 512, 8e-6 * 8 / 512, 8e-5 * 8 / 512))
    same = load_config(path)  # --cfg OUTPUT/config.yaml: the same run, the same folder
    assert same.dump() == run.dump()
    for flags, output in [
        ({'tag': 'new'}, os.path.join(str(tmp_path / 'out'), 'simmim_pretrain', 'new')),
        (
            {'output': str(tmp_path / 'b')},
            os.path.join(str(tmp_path / 'b'), 'simmim_pretrain', 'tiny'),
        ),
        (
            {'output': str(tmp_path / 'b'), 'tag': 'n'},
            os.path.join(str(tmp_path / 'b'), 'simmim_pretrain', 'n'),
        ),
    ]:
        notes = []
        config = load_config(path, notes=notes, **flags)
        assert config.OUTPUT == output
        assert (config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR) == lrs
        assert [n for n in notes if f'this run uses {output} instead' in n]


def test_a_run_config_with_another_batch_keeps_its_rates_and_says_so(tmp_path):
    run, path = _stored_run_config(tmp_path)
    notes = []
    config = load_config(path, batch_size=16, notes=notes)
    assert config.DATA.BATCH_SIZE == 16 and config.TRAIN.BASE_LR == run.TRAIN.BASE_LR
    assert config.OUTPUT == run.OUTPUT
    assert [n for n in notes if '16 x 1 here and 8 x 1' in n and 'not scaled again' in n]


def test_asking_for_mixed_precision_on_the_cpu_is_answered_in_the_log():
    cpu = torch.device('cpu')
    config = load_config(TINY, amp_opt_level='O1')
    assert autocast_dtype(config, cpu) is None
    assert 'only used on CUDA, and this run is on cpu' in describe_autocast(config, cpu, None)
    off = load_config(TINY, amp_opt_level='O0')
    assert describe_autocast(off, cpu, None) == 'off (fp32)'
    assert describe_autocast(config, cpu, torch.bfloat16) == 'torch.bfloat16'
