"""optimizer.py: weight-decay groups, layer-wise LR decay (applied once), optimizer choice."""

import logging

import pytest
import torch
from torch import nn

from config import get_defaults, load_config
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer, build_param_groups, layer_lr_scales, supports_found_inf
from tests.fixture_rule import load_compact


# -----------------------------------------------------------------------------------------------
# Tiny modules with the official parameter names
# -----------------------------------------------------------------------------------------------
class TinyAttention(nn.Module):
    def __init__(self, dim=4, heads=1, table_rows=9):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, heads))
        self.qkv = nn.Linear(dim, 3 * dim)


class TinyBlock(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TinyAttention(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, dim)


class TinyStage(nn.Module):
    def __init__(self, depth, downsample, dim=4):
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        if downsample:
            self.downsample = nn.Module()
            self.downsample.reduction = nn.Linear(4 * dim, dim, bias=False)
            self.downsample.norm = nn.LayerNorm(4 * dim)


class TinySwin(nn.Module):
    """Official Swin names: patch_embed.*, absolute_pos_embed, layers.i.blocks.j.*,
    layers.i.downsample.*, norm.*, head.* (and mask_token, as the pre-training encoder)."""

    def __init__(self, depths=(2, 2, 2, 2), dim=4):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2)
        self.patch_embed.norm = nn.LayerNorm(dim)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 16, dim))
        self.layers = nn.ModuleList(
            TinyStage(d, i < len(depths) - 1, dim) for i, d in enumerate(depths)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def no_weight_decay(self):
        return {'absolute_pos_embed', 'mask_token'}

    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table'}


class TinyViT(nn.Module):
    """Official BEiT/SimMIM ViT names."""

    def __init__(self, depth=12, dim=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2)
        self.rel_pos_bias = TinyAttention(dim)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}


class TinySimMIM(nn.Module):
    """The pre-training wrapper's contract: prefixed names, UNprefixed keywords."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = nn.Sequential(nn.Conv2d(4, 12, 1), nn.PixelShuffle(2))

    def no_weight_decay(self):
        return {'encoder.' + n for n in self.encoder.no_weight_decay()}

    def no_weight_decay_keywords(self):
        return set(getattr(self.encoder, 'no_weight_decay_keywords', set)())


def make_config(
    model_type='swin', layer_decay=1.0, depths=(2, 2, 2, 2), vit_depth=12, optimizer='adamw'
):
    config = get_defaults()
    config.MODEL.TYPE = model_type
    config.MODEL.SWIN.DEPTHS = list(depths)
    config.MODEL.SWINV2.DEPTHS = list(depths)
    config.MODEL.VIT.DEPTH = vit_depth
    config.TRAIN.BASE_LR = 1e-3
    config.TRAIN.WEIGHT_DECAY = 0.05
    config.TRAIN.LAYER_DECAY = layer_decay
    config.TRAIN.OPTIMIZER.NAME = optimizer
    return config


def group_of(groups):
    return {name: g for g in groups for name in g['param_names']}


# -----------------------------------------------------------------------------------------------
# Weight decay membership
# -----------------------------------------------------------------------------------------------
def test_pretraining_weight_decay_membership_uses_names_and_keywords():
    model = TinySimMIM(TinySwin())
    groups = build_param_groups(make_config(), model, is_pretrain=True)
    assert [g['group_name'] for g in groups] == ['no_decay', 'decay']
    where = {name: g['weight_decay'] for name, g in group_of(groups).items()}
    no_decay = [
        'encoder.mask_token',  # named by no_weight_decay (3-D)
        'encoder.absolute_pos_embed',  # named by no_weight_decay (3-D)
        # keyword match despite the 'encoder.' prefix (official bug fixed on purpose)
        'encoder.layers.0.blocks.0.attn.relative_position_bias_table',
        'encoder.layers.0.blocks.0.norm1.weight',  # 1-D
        'encoder.layers.0.blocks.0.attn.qkv.bias',
        'decoder.0.bias',
    ]  # biases
    decay = [
        'encoder.patch_embed.proj.weight',
        'encoder.layers.0.blocks.0.attn.qkv.weight',
        'encoder.layers.0.downsample.reduction.weight',
        'encoder.head.weight',
        'decoder.0.weight',
    ]
    assert {n: where[n] for n in no_decay} == {n: 0.0 for n in no_decay}
    assert {n: where[n] for n in decay} == {n: 0.05 for n in decay}
    assert all(g['lr'] == 1e-3 and g['lr_scale'] == 1.0 for g in groups)
    assert len(where) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = TinySwin()
    model.patch_embed.requires_grad_(False)
    names = group_of(build_param_groups(make_config(), model, is_pretrain=False))
    assert not any(n.startswith('patch_embed') for n in names)
    assert 'head.weight' in names


def test_models_without_skip_methods_decay_all_matrices():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    where = {
        n: g['weight_decay'] for n, g in group_of(build_param_groups(make_config(), model)).items()
    }
    assert where == {'0.weight': 0.05, '0.bias': 0.0, '1.weight': 0.0, '1.bias': 0.0}


# -----------------------------------------------------------------------------------------------
# Layer-wise LR decay
# -----------------------------------------------------------------------------------------------
def print_scales(title, scales, names):
    print(f'\n{title}')
    for name in names:
        print(f'  {name:45s} {scales[name]:.6f}')


def test_swin_base_layer_scales_match_hand_computed_values():
    config = make_config('swin', 0.8, depths=(2, 2, 18, 2))  # L = 24
    scales = layer_lr_scales(config, TinySwin(depths=(2, 2, 18, 2)))
    expected = {
        'mask_token': 0.8**25,
        'patch_embed.proj.weight': 0.8**25,  # ~0.0038
        'layers.0.blocks.0.attn.qkv.weight': 0.8**24,  # ~0.0047
        'layers.0.blocks.1.norm1.weight': 0.8**23,
        'layers.0.downsample.reduction.weight': 0.8 ** (25 - 2),  # id of stage 0's last block
        'layers.2.blocks.0.attn.relative_position_bias_table': 0.8 ** (25 - 5),  # ~0.0115
        'layers.2.downsample.norm.weight': 0.8 ** (25 - 22),
        'layers.3.blocks.1.mlp.fc1.weight': 0.8,  # last block, id 24
        'absolute_pos_embed': 1.0,  # official: everything else is L + 1
        'norm.weight': 1.0,
        'head.weight': 1.0,
    }
    print_scales('Swin [2, 2, 18, 2], layer decay 0.8', scales, expected)
    assert {n: scales[n] for n in expected} == pytest.approx(expected)
    assert scales['patch_embed.proj.weight'] == pytest.approx(0.0038, abs=5e-5)
    assert scales['layers.0.blocks.0.attn.qkv.weight'] == pytest.approx(0.0047, abs=5e-5)
    assert scales['layers.2.blocks.0.attn.qkv.weight'] == pytest.approx(0.0115, abs=5e-5)


def test_vit_base_layer_scales_match_hand_computed_values():
    config = make_config('vit', 0.65, vit_depth=12)
    scales = layer_lr_scales(config, TinyViT(depth=12))
    expected = {
        'cls_token': 0.65**13,
        'mask_token': 0.65**13,
        'pos_embed': 0.65**13,
        'patch_embed.proj.weight': 0.65**13,  # ~0.0037
        'blocks.0.attn.qkv.weight': 0.65**12,  # ~0.0057
        'blocks.11.mlp.fc1.bias': 0.65,
        'rel_pos_bias.relative_position_bias_table': 1.0,
        'fc_norm.weight': 1.0,
        'head.weight': 1.0,
    }
    print_scales('ViT depth 12, layer decay 0.65', scales, expected)
    assert {n: scales[n] for n in expected} == pytest.approx(expected)
    assert scales['patch_embed.proj.weight'] == pytest.approx(0.0037, abs=5e-5)
    assert scales['blocks.0.attn.qkv.weight'] == pytest.approx(0.0057, abs=5e-5)


def test_finetune_groups_are_per_layer_and_decay_kind():
    config = make_config('vit', 0.65, vit_depth=2)
    groups = build_param_groups(config, TinyViT(depth=2), is_pretrain=False)
    by_name = {g['group_name']: g for g in groups}
    assert set(by_name) == {
        'layer_0_no_decay',
        'layer_0_decay',
        'layer_1_decay',
        'layer_1_no_decay',
        'layer_2_decay',
        'layer_2_no_decay',
        'layer_3_decay',
        'layer_3_no_decay',
    }
    for g in groups:
        layer = int(g['group_name'].split('_')[1])
        assert g['lr_scale'] == pytest.approx(0.65 ** (3 - layer))
        assert g['lr'] == pytest.approx(1e-3 * g['lr_scale'])
        assert g['weight_decay'] == (0.0 if g['group_name'].endswith('no_decay') else 0.05)
        assert set(g) >= {'group_name', 'params', 'param_names', 'weight_decay', 'lr', 'lr_scale'}
    assert 'patch_embed.proj.weight' in by_name['layer_0_decay']['param_names']
    assert 'cls_token' in by_name['layer_0_no_decay']['param_names']


def test_layer_decay_is_ignored_in_pretraining():
    groups = build_param_groups(make_config('swin', 0.8), TinySwin(), is_pretrain=True)
    assert {g['lr_scale'] for g in groups} == {1.0}


@pytest.mark.parametrize('warmup_prefix, update', [(True, 20), (False, 0)])
def test_layer_decay_is_applied_exactly_once(warmup_prefix, update):
    config = make_config('swin', 0.8, depths=(2, 2, 18, 2))
    config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS = 10, 2
    config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = warmup_prefix
    if not warmup_prefix:
        config.TRAIN.WARMUP_EPOCHS = 0  # then update 0 is the peak
    optimizer = build_optimizer(config, TinySwin(depths=(2, 2, 18, 2)), is_pretrain=False)
    scheduler = build_scheduler(config, optimizer, n_iter_per_epoch=10)
    scheduler.step_update(update)
    for g in optimizer.param_groups:
        assert g['lr'] == pytest.approx(1e-3 * g['lr_scale'])  # not 1e-3 * lr_scale ** 2
    patch_embed = next(g for g in optimizer.param_groups if g['group_name'] == 'layer_0_decay')
    assert patch_embed['lr'] == pytest.approx(1e-3 * 0.8**25)


# -----------------------------------------------------------------------------------------------
# Optimizers
# -----------------------------------------------------------------------------------------------
def test_adamw_is_fused_on_cpu_and_skips_a_step_flagged_by_found_inf():
    config = make_config()
    model = TinySwin()
    optimizer = build_optimizer(config, model, is_pretrain=True)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults['fused'] and supports_found_inf(optimizer)
    assert optimizer.defaults['betas'] == (0.9, 0.999) and optimizer.defaults['eps'] == 1e-8
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    optimizer.found_inf = torch.zeros(())
    optimizer.step()
    assert not torch.equal(before[0], next(model.parameters()))


def test_sgd_uses_nesterov_momentum():
    optimizer = build_optimizer(make_config(optimizer='sgd'), TinySwin())
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults['nesterov'] and optimizer.defaults['momentum'] == 0.9
    assert supports_found_inf(optimizer)


def test_non_float_parameters_fall_back_to_foreach():
    model = nn.Linear(2, 2)
    model.register_parameter('scale', nn.Parameter(torch.ones(2, dtype=torch.complex64)))
    optimizer = build_optimizer(make_config(), model)
    assert optimizer.defaults['foreach'] and not supports_found_inf(optimizer)


def test_lars_for_linear_probing():
    from timm.optim import Lars

    optimizer = build_optimizer(make_config(optimizer='lars'), TinyViT(depth=1))
    assert isinstance(optimizer, Lars) and not supports_found_inf(optimizer)


def test_groups_are_logged(caplog):
    logger = logging.getLogger('test_optimizer')
    with caplog.at_level(logging.INFO, logger='test_optimizer'):
        build_optimizer(
            make_config('vit', 0.65, vit_depth=2), TinyViT(depth=2), logger, is_pretrain=False
        )
    text = caplog.text
    assert 'AdamW' in text and 'layer_0_decay' in text and 'lr_scale 0.4225' in text
    assert 'weight_decay 0.05' in text


# -----------------------------------------------------------------------------------------------
# Real models (built on the meta device: names and shapes only)
# -----------------------------------------------------------------------------------------------
def real_model(cfg_path, is_pretrain, opts=()):
    # ImageNet's 1000 classes, as the data would set them (the config default 0 means "from data").
    config = load_config(cfg_path, ['MODEL.NUM_CLASSES', 1000, *opts], is_pretrain=is_pretrain)
    with torch.device('meta'):
        return config, build_model(config, is_pretrain=is_pretrain)


def fixture_config_path(tmp_path, name, which):
    path = tmp_path / f'{name}_{which}.yaml'
    path.write_text(load_compact(name)[f'{which}_yaml'])
    return str(path)


def test_real_swin_base_layer_scales():
    config, model = real_model(
        'configs/simmim/simmim_finetune__swin_base__img224_window7__800ep.yaml', False
    )
    assert config.TRAIN.LAYER_DECAY == 0.8 and list(config.MODEL.SWIN.DEPTHS) == [2, 2, 18, 2]
    scales = layer_lr_scales(config, model)
    expected = {
        'patch_embed.proj.weight': 0.8**25,
        'layers.0.blocks.0.attn.qkv.weight': 0.8**24,
        'layers.0.downsample.reduction.weight': 0.8**23,
        'layers.2.blocks.0.mlp.fc1.weight': 0.8**20,
        'layers.3.blocks.1.norm2.bias': 0.8,
        'norm.weight': 1.0,
        'head.weight': 1.0,
    }
    print_scales('Swin-B (real model), layer decay 0.8', scales, expected)
    assert {n: scales[n] for n in expected} == pytest.approx(expected)
    assert len(scales) == len(list(model.parameters()))


def test_real_vit_base_layer_scales():
    config, model = real_model(
        'configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml', False
    )
    assert config.TRAIN.LAYER_DECAY == 0.65 and config.MODEL.VIT.DEPTH == 12
    scales = layer_lr_scales(config, model)
    expected = {
        'cls_token': 0.65**13,
        'patch_embed.proj.weight': 0.65**13,
        'blocks.0.attn.qkv.weight': 0.65**12,
        'blocks.0.attn.relative_position_bias_table': 0.65**12,
        'blocks.11.gamma_2': 0.65,
        'fc_norm.weight': 1.0,
        'head.weight': 1.0,
    }
    print_scales('ViT-B (real model), layer decay 0.65', scales, expected)
    assert {n: scales[n] for n in expected} == pytest.approx(expected)


def test_real_swin_base_scale_is_applied_once():
    config, model = real_model(
        'configs/simmim/simmim_finetune__swin_base__img224_window7__800ep.yaml',
        False,
        ['TRAIN.LR_SCHEDULER.WARMUP_PREFIX', 'True'],
    )
    optimizer = build_optimizer(config, model, is_pretrain=False)
    scheduler = build_scheduler(config, optimizer, n_iter_per_epoch=10)
    scheduler.step_update(config.TRAIN.WARMUP_EPOCHS * 10)  # first update after the warmup
    for g in optimizer.param_groups:
        assert g['lr'] == pytest.approx(config.TRAIN.BASE_LR * g['lr_scale'])
    lowest = min(optimizer.param_groups, key=lambda g: g['lr'])
    assert lowest['lr'] == pytest.approx(config.TRAIN.BASE_LR * 0.8**25)


@pytest.mark.parametrize(
    'name, no_decay, decay',
    [
        (
            'swin',
            [
                'encoder.mask_token',
                'encoder.layers.0.blocks.0.attn.relative_position_bias_table',
                'encoder.patch_embed.norm.weight',
                'decoder.0.bias',
            ],
            ['encoder.layers.0.blocks.0.attn.qkv.weight', 'decoder.0.weight'],
        ),
        (
            'swinv2',
            [
                'encoder.mask_token',
                'encoder.layers.0.blocks.0.attn.logit_scale',
                'encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight',
                'encoder.layers.0.blocks.0.attn.cpb_mlp.2.weight',
            ],
            ['encoder.layers.0.blocks.0.attn.qkv.weight', 'encoder.patch_embed.proj.weight'],
        ),
        (
            'vit',
            [
                'encoder.mask_token',
                'encoder.cls_token',
                'encoder.pos_embed',
                'encoder.rel_pos_bias.relative_position_bias_table',
                'encoder.blocks.0.gamma_1',
            ],
            ['encoder.blocks.0.attn.qkv.weight', 'decoder.0.weight'],
        ),
    ],
)
def test_real_simmim_pretraining_weight_decay_membership(tmp_path, name, no_decay, decay):
    config, model = real_model(fixture_config_path(tmp_path, name, 'pretrain'), True)
    where = {
        n: g['weight_decay']
        for n, g in group_of(build_param_groups(config, model, is_pretrain=True)).items()
    }
    assert {n: where[n] for n in no_decay} == {n: 0.0 for n in no_decay}
    assert {n: where[n] for n in decay} == {n: config.TRAIN.WEIGHT_DECAY for n in decay}


VIT_FINETUNE = 'configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml'


@pytest.mark.parametrize('rules, table_decay', [('ours', 0.0), ('official', 0.05)])
def test_vit_finetuning_position_tables_follow_the_weight_decay_rules(rules, table_decay):
    # Ours: no weight decay for any position table, as docs/differences.md says; official: the
    # BEiT-style ViT named none, so its per-block tables were decayed in fine-tuning.
    config, model = real_model(VIT_FINETUNE, False, ['TRAIN.WEIGHT_DECAY_RULES', rules])
    groups = group_of(build_param_groups(config, model, is_pretrain=False))
    tables = [n for n in groups if n.endswith('relative_position_bias_table')]
    assert len(tables) == 12  # one per block
    assert {n: groups[n]['weight_decay'] for n in tables} == {n: table_decay for n in tables}
    assert groups['blocks.0.attn.relative_position_bias_table']['group_name'] == (
        'layer_1_no_decay' if rules == 'ours' else 'layer_1_decay'
    )
    # The same for both: 1-D, biases, named tokens; matrices decayed.
    for name in (
        'cls_token',
        'blocks.0.gamma_1',
        'blocks.0.attn.q_bias',
        'fc_norm.weight',
        'head.bias',
    ):
        assert groups[name]['weight_decay'] == 0.0, name
    for name in ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'head.weight'):
        assert groups[name]['weight_decay'] == 0.05, name


@pytest.mark.parametrize(
    'cfg, decayed_officially',
    [
        (
            'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml',
            ['encoder.layers.0.blocks.0.attn.relative_position_bias_table'],
        ),
        (
            'configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml',
            [
                'encoder.layers.0.blocks.0.attn.logit_scale',
                'encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight',
            ],
        ),
        (
            'configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml',
            ['encoder.mask_token', 'encoder.rel_pos_bias.relative_position_bias_table'],
        ),
    ],
)
def test_official_weight_decay_rules_reproduce_the_official_pretraining_bugs(
    cfg, decayed_officially
):
    ours_config, model = real_model(cfg, True)
    ours = group_of(build_param_groups(ours_config, model, is_pretrain=True))
    official_config, _ = real_model(cfg, True, ['TRAIN.WEIGHT_DECAY_RULES', 'official'])
    official = group_of(build_param_groups(official_config, model, is_pretrain=True))
    assert {n: ours[n]['weight_decay'] for n in decayed_officially} == dict.fromkeys(
        decayed_officially, 0.0
    )
    assert {n: official[n]['weight_decay'] for n in decayed_officially} == dict.fromkeys(
        decayed_officially, 0.05
    )
    # Exact names still matched officially: Swin's mask token, ViT's cls token; 1-D as ever.
    kept = 'encoder.cls_token' if 'vit' in cfg else 'encoder.mask_token'
    assert official[kept]['weight_decay'] == 0.0
    different = {n for n in ours if ours[n]['weight_decay'] != official[n]['weight_decay']}
    assert all(
        n.endswith(('relative_position_bias_table', 'logit_scale', 'mask_token'))
        or '.cpb_mlp.' in n
        for n in different
    )
