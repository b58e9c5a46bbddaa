"""checkpoint/weights.py and utils/pos_embed.py: loading a SimMIM checkpoint for fine-tuning
reproduces the official load_pretrained (compact fixtures of the official code, tests/fixtures)."""

import logging

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicSpline

from checkpoint.weights import adapt_state_dict, check_compatible, load_pretrained
from config import load_config
from models import build_model
from tests.fixture_rule import NAMES
from tests.fixture_rule import official_data as load_fixture
from utils.errors import IncompatibleCheckpointError
from utils.pos_embed import (
    geometric_positions,
    geometric_ratio,
    resize_abs_pos_embed,
    resize_rel_pos_bias_table,
)
from utils.state_dict import summarize_keys

NEW_HEAD = ('head.', 'fc_norm.')  # not in a pre-training checkpoint: left at the rule's values


@pytest.fixture(params=NAMES)
def fixture(request):
    return request.param, load_fixture(request.param)


def finetune_setup(tmp_path, name, pretrain_state_dict=None):
    """(config, fine-tune model) for fixture `name`, with MODEL.PRETRAINED pointing at a
    checkpoint {'model': pretrain_state_dict} (default: the fixture's pre-trained weights)."""
    data = load_fixture(name)
    checkpoint = tmp_path / 'pretrained.pth'
    sd = data['pretrain_state_dict'] if pretrain_state_dict is None else pretrain_state_dict
    torch.save({'model': sd, 'epoch': 799}, checkpoint)
    cfg = tmp_path / 'finetune.yaml'
    cfg.write_text(data['finetune_yaml'])
    config = load_config(str(cfg), ['MODEL.PRETRAINED', str(checkpoint)], is_pretrain=False)
    torch.manual_seed(0)
    return config, build_model(config, is_pretrain=False)


# -----------------------------------------------------------------------------------------------
# Geometric interpolation of relative-position tables
# -----------------------------------------------------------------------------------------------
def slow_geometric_resize(table, dst):
    """The formula of reference 6.3 written out: bisection for q, positions 0, +-1, +-(1+q), ...,
    then a not-a-knot cubic spline per axis (what interp2d's s=0 bicubic spline is on a grid),
    evaluated at the integer offsets clamped to the source range (FITPACK clamps)."""
    src = int(round(table.shape[0] ** 0.5))
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2
        if sum(q**i for i in range(src // 2)) > dst // 2:
            right = q
        else:
            left = q
    positions, current = [], 1.0
    for i in range(src // 2):
        positions.append(current)
        current += q ** (i + 1)
    x = np.array([-p for p in reversed(positions)] + [0.0] + positions)
    targets = np.clip(np.arange(-(dst // 2), dst // 2 + 1), x[0], x[-1])
    heads = []
    for h in range(table.shape[1]):
        z = table[:, h].reshape(src, src).double().numpy()
        z = CubicSpline(x, CubicSpline(x, z, axis=0)(targets), axis=1)(targets)
        heads.append(z.reshape(-1))
    return torch.from_numpy(np.stack(heads, 1))


@pytest.mark.parametrize('src, dst, q', [(11, 13, 1.0913), (23, 27, 1.0329)])
def test_geometric_ratio_and_positions(src, dst, q):
    ratio = geometric_ratio(src, dst)
    assert ratio == pytest.approx(q, abs=1e-4)
    positions = geometric_positions(src, ratio)
    assert len(positions) == src and positions[src // 2] == 0
    assert positions[-1] == pytest.approx(dst // 2, abs=1e-3)  # outermost lands on the target
    assert np.allclose(positions, -positions[::-1])


@pytest.mark.parametrize('src, dst', [(11, 13), (23, 27), (13, 11)])
def test_geometric_resize_matches_the_formula(src, dst):
    table = torch.randn(src * src, 2, generator=torch.Generator().manual_seed(0))
    resized = resize_rel_pos_bias_table(table, dst)
    assert resized.shape == (dst * dst, 2) and resized.dtype == table.dtype
    torch.testing.assert_close(
        resized.double(), slow_geometric_resize(table, dst), rtol=1e-5, atol=1e-6
    )


def test_geometric_resize_keeps_the_centre_and_extra_rows():
    table = torch.randn(11 * 11 + 3, 4)
    resized = resize_rel_pos_bias_table(table, 13, num_extra_tokens=3)
    assert resized.shape == (13 * 13 + 3, 4)
    torch.testing.assert_close(resized[-3:], table[-3:], rtol=0, atol=0)
    centre_src, centre_dst = 11 * 11 // 2, 13 * 13 // 2  # offset (0, 0)
    torch.testing.assert_close(resized[centre_dst], table[centre_src], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resize_rel_pos_bias_table(table, 11, 3), table, rtol=0, atol=0)


def test_tables_of_windows_2_and_1_resize_to_any_window():
    """A 3x3 table (window 2) has too few offsets for a bicubic spline or a geometric ratio: its
    offsets -1, 0, 1 are stretched to the target's edges and interpolated quadratically, so a
    product of quadratics in the offsets is reproduced exactly. A 1x1 table is a constant."""

    def quadratic(x):
        return 0.3 + 0.2 * x - 0.05 * x**2

    def table_of(side, half):  # rows (dy, dx) in the models' order, dy and dx scaled to +-half
        offsets = torch.linspace(-half, half, side, dtype=torch.float64)
        grid = quadratic(offsets)[:, None] * (1 + quadratic(offsets))[None, :]
        return grid.reshape(-1, 1)

    for dst in (5, 13):
        resized = resize_rel_pos_bias_table(table_of(3, dst // 2), dst)
        torch.testing.assert_close(resized, table_of(dst, dst // 2), rtol=1e-9, atol=1e-9)
    constant = torch.tensor([[0.7, -0.2]])
    torch.testing.assert_close(resize_rel_pos_bias_table(constant, 7), constant.expand(49, 2))


def test_abs_pos_embed_resize_keeps_cls_and_constant_fields():
    pos = torch.cat([torch.randn(1, 1, 8), torch.full((1, 14 * 14, 8), 0.5)], dim=1)
    resized = resize_abs_pos_embed(pos, (16, 16), num_extra_tokens=1)
    assert resized.shape == (1, 1 + 16 * 16, 8)
    torch.testing.assert_close(resized[:, :1], pos[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 256, 8), 0.5))


# -----------------------------------------------------------------------------------------------
# Conformance with the official load_pretrained (fixtures)
# -----------------------------------------------------------------------------------------------
def test_remap_reproduces_the_official_finetune_weights(fixture):
    name, data = fixture
    official = data['finetune_state_dict']
    ours = adapt_state_dict(data['pretrain_state_dict'], official, name)
    check_compatible(ours, official)
    compared = 0
    for key, value in official.items():
        if key.startswith(NEW_HEAD):
            continue
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=key)
        compared += 1
    assert compared == sum(not k.startswith(NEW_HEAD) for k in official)
    assert set(ours) - set(official) <= {'norm.weight', 'norm.bias'}  # ViT: mean pooling at FT


def test_remap_accepts_wrapped_and_prefixed_checkpoints():
    data = load_fixture('swin')
    official = data['finetune_state_dict']
    plain = adapt_state_dict(data['pretrain_state_dict'], official, 'swin')
    for wrapped in (
        {'model': {'module.' + k: v for k, v in data['pretrain_state_dict'].items()}},
        {'state_dict': {'_orig_mod.' + k: v for k, v in data['pretrain_state_dict'].items()}},
        {
            'module': {
                k[len('encoder.') :]: v
                for k, v in data['pretrain_state_dict'].items()
                if k.startswith('encoder.')
            }
        },
    ):
        ours = adapt_state_dict(wrapped, official, 'swin')
        assert ours.keys() == plain.keys()
        assert all(torch.equal(ours[k], plain[k]) for k in plain)
    assert 'mask_token' not in plain and not any(k.startswith('decoder') for k in plain)


def test_released_swinv2_names_and_rebuilt_buffers_are_handled():
    data = load_fixture('swinv2')
    sd = {k.replace('cpb_mlp', 'rpe_mlp'): v for k, v in data['pretrain_state_dict'].items()}
    sd['encoder.layers.0.blocks.0.attn.relative_coords_table'] = torch.zeros(1, 23, 23, 2)
    sd['encoder.layers.0.blocks.1.attn_mask'] = torch.zeros(16, 144, 144)
    ours = adapt_state_dict(sd, data['finetune_state_dict'], 'swinv2')
    assert not any('rpe_mlp' in k or 'coords_table' in k or 'attn_mask' in k for k in ours)
    assert 'layers.0.blocks.0.attn.cpb_mlp.0.weight' in ours


def test_load_pretrained_reproduces_the_official_model(tmp_path, fixture):
    # load_pretrained gives the official fine-tune weights, and with the rule's head and fc_norm
    # the official logits.
    name, data = fixture
    config, model = finetune_setup(tmp_path, name)
    report = load_pretrained(config, model, logging.getLogger('test_pretrained'))
    official = data['finetune_state_dict']
    state = model.state_dict()
    for key, value in official.items():
        if not key.startswith(NEW_HEAD):
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert all(k.startswith(NEW_HEAD) for k in report.missing_keys)
    heads = {k: v for k, v in official.items() if k.startswith(NEW_HEAD)}
    assert model.load_state_dict(heads, strict=False).unexpected_keys == []
    model.eval()
    with torch.no_grad():
        logits = model(data['x_ft'])
    torch.testing.assert_close(logits, data['logits'], rtol=1e-5, atol=1e-5)


def test_load_pretrained_logs_new_and_ignored_keys_in_plain_words(tmp_path, caplog):
    config, model = finetune_setup(tmp_path, 'vit')
    with caplog.at_level(logging.INFO, logger='test_pretrained'):
        report = load_pretrained(config, model, logging.getLogger('test_pretrained'))
    assert sorted(report.missing_keys) == [
        'fc_norm.bias',
        'fc_norm.weight',
        'head.bias',
        'head.weight',
    ]
    assert sorted(report.unexpected_keys) == ['norm.bias', 'norm.weight']
    assert report.num_loaded == len(load_fixture('vit')['finetune_state_dict']) - 4
    assert 'Newly initialised (not in checkpoint): fc_norm.*, head.*' in caplog.text
    assert 'Ignored (not in model): norm.*' in caplog.text
    assert (
        'Copied the shared rel_pos_bias.relative_position_bias_table into the 2 blocks'
        in caplog.text
    )


def test_vit_checkpoint_without_shared_table_loads(tmp_path, caplog):
    # Official bug (SimMIM issue #19): KeyError when the checkpoint has no shared table.
    sd = {
        k: v
        for k, v in load_fixture('vit')['pretrain_state_dict'].items()
        if 'rel_pos_bias' not in k
    }
    config, model = finetune_setup(tmp_path, 'vit', sd)
    with caplog.at_level(logging.INFO, logger='test_pretrained'):
        report = load_pretrained(config, model, logging.getLogger('test_pretrained'))
    assert 'blocks.0.attn.relative_position_bias_table' in report.missing_keys
    assert 'blocks.*.attn.relative_position_bias_table (x2)' in caplog.text


def test_checkpoint_of_another_architecture_fails_naming_keys(tmp_path):
    config, model = finetune_setup(tmp_path, 'vit', load_fixture('swin')['pretrain_state_dict'])
    with pytest.raises(IncompatibleCheckpointError, match='another architecture or size') as e:
        load_pretrained(config, model)
    assert 'patch_embed.proj.weight: checkpoint (24, 3, 4, 4) vs model (48, 3, 16, 16)' in str(
        e.value
    )
    swin, swinv2 = load_fixture('swin'), load_fixture('swinv2')
    with pytest.raises(IncompatibleCheckpointError, match=r'downsample.norm.weight: checkpoint'):
        check_compatible(
            adapt_state_dict(swin['pretrain_state_dict'], swinv2['finetune_state_dict'], 'swinv2'),
            swinv2['finetune_state_dict'],
        )


def test_vit_tables_are_resized_to_a_new_patch_grid():
    data = load_fixture('vit')
    model_state = dict(data['finetune_state_dict'])  # 14 x 14 patches -> 16 x 16 (256 px)
    for i in range(2):
        model_state[f'blocks.{i}.attn.relative_position_bias_table'] = torch.zeros(31 * 31 + 3, 3)
    model_state['pos_embed'] = torch.zeros(1, 1 + 16 * 16, 48)
    ours = adapt_state_dict(data['pretrain_state_dict'], model_state, 'vit')
    check_compatible(ours, model_state)
    shared = data['pretrain_state_dict']['encoder.rel_pos_bias.relative_position_bias_table']
    table = ours['blocks.1.attn.relative_position_bias_table']
    assert table.shape == (31 * 31 + 3, 3)
    torch.testing.assert_close(table[-3:], shared[-3:], rtol=0, atol=0)
    assert ours['pos_embed'].shape == (1, 257, 48)
    with pytest.raises(NotImplementedError, match='non-square'):
        adapt_state_dict(data['pretrain_state_dict'], model_state, 'vit', patch_grid=(16, 12))


# -----------------------------------------------------------------------------------------------
# Wrong checkpoints fail loudly
# -----------------------------------------------------------------------------------------------
def test_checkpoint_of_another_size_fails_naming_shapes():
    data = load_fixture('swin')
    bigger = {
        k: torch.zeros(*(2 * s if s == 24 else s for s in v.shape))
        for k, v in data['finetune_state_dict'].items()
    }  # embed 24 -> 48 in stage 0
    sd = adapt_state_dict(data['pretrain_state_dict'], bigger, 'swin')
    with pytest.raises(
        IncompatibleCheckpointError,
        match=r'patch_embed.proj.weight: checkpoint \(24, 3, 4, 4\) vs model '
        r'\(48, 3, 4, 4\)',
    ):
        check_compatible(sd, bigger)


def test_head_count_mismatch_names_key_and_shapes():
    data = load_fixture('swin')
    model_state = dict(data['finetune_state_dict'])
    key = 'layers.1.blocks.0.attn.relative_position_bias_table'
    model_state[key] = torch.zeros(169, 3)
    with pytest.raises(IncompatibleCheckpointError, match=rf'{key}.*\(121, 2\).*\(169, 3\)'):
        adapt_state_dict(data['pretrain_state_dict'], model_state, 'swin')


def test_mostly_missing_backbone_fails():
    data = load_fixture('swin')
    sd = adapt_state_dict(data['pretrain_state_dict'], data['finetune_state_dict'], 'swin')
    partial = {k: v for k, v in sd.items() if not k.startswith(('layers.2', 'layers.3'))}
    with pytest.raises(IncompatibleCheckpointError, match='not in the checkpoint'):
        check_compatible(partial, data['finetune_state_dict'])


def test_classifier_head_of_another_size_is_not_loaded():
    data = load_fixture('swin')
    sd = dict(data['finetune_state_dict'])
    sd['head.weight'], sd['head.bias'] = torch.zeros(1000, 192), torch.zeros(1000)
    ours = adapt_state_dict(sd, data['finetune_state_dict'], 'swin')
    assert 'head.weight' not in ours and 'head.bias' not in ours
    check_compatible(ours, data['finetune_state_dict'])


def test_summarize_keys_groups_modules_and_blocks():
    reference = [
        'head.weight',
        'head.bias',
        'norm.weight',
        'norm.bias',
        'blocks.0.attn.table',
        'blocks.1.attn.table',
        'blocks.1.attn.qkv.weight',
    ]
    text = summarize_keys(
        ['head.weight', 'head.bias', 'norm.weight', 'blocks.0.attn.table', 'blocks.1.attn.table'],
        reference,
    )
    assert text == 'head.*, norm.weight, blocks.*.attn.table (x2)'
