"""configs/ablations: one YAML per row of Tables 1-5, each changing one option of the default; every
one builds at full size (meta device) and trains as a tiny model; two tiny end-to-end runs; the
validation of the ablation keys."""

import glob
import os

import pytest
import torch

import main_simmim
from config import load_config
from data.masking import build_mask_generator
from models import build_model, model_patch_size
from models.dvae import DiscreteVAE, save_tokenizer
from models.heads import count_parameters
from tests.conftest import ROOT
from tools.build_color_palette import main as build_palette
from tools.train_dvae import main as train_dvae
from utils.errors import ConfigError

ABLATIONS = os.path.join(ROOT, 'configs', 'ablations')
DEFAULT = os.path.join(ABLATIONS, 'default__swin_base__img192_window6__100ep.yaml')
ROWS = sorted(glob.glob(os.path.join(ABLATIONS, 'table*', '*.yaml')))
ROW_IDS = [os.path.relpath(p, ABLATIONS)[:-5] for p in ROWS]

# A tiny Swin with the same 4 stages (encoder stride 32), and a tiny inverse Swin, at 64 px.
TINY = [
    'DATA.IMG_SIZE',
    64,
    'MODEL.SWIN.EMBED_DIM',
    8,
    'MODEL.SWIN.DEPTHS',
    [1, 1, 1, 1],
    'MODEL.SWIN.NUM_HEADS',
    [1, 1, 1, 1],
    'MODEL.SWIN.WINDOW_SIZE',
    2,
    'MODEL.SIMMIM.HEAD.INVERSE_SWIN.EMBED_DIM',
    4,
    'MODEL.SIMMIM.HEAD.INVERSE_SWIN.DEPTHS',
    [1, 1, 1, 1],
    'MODEL.SIMMIM.HEAD.INVERSE_SWIN.NUM_HEADS',
    [1, 1, 1, 1],
    'MODEL.SIMMIM.HEAD.INVERSE_SWIN.WINDOW_SIZE',
    2,
]
# Which keys each table may change (besides TAG).
TABLE_KEYS = {
    'table1_masking': ('DATA.MASK_STRATEGY', 'DATA.MASK_PATCH_SIZE', 'DATA.MASK_RATIO'),
    'table2_head': ('MODEL.SIMMIM.HEAD.',),
    'table3_resolution': ('MODEL.SIMMIM.TARGET.DOWNSAMPLE',),
    'table4_scope': ('MODEL.SIMMIM.LOSS.SCOPE',),
    'table5_target': ('MODEL.SIMMIM.TARGET.', 'MODEL.SIMMIM.LOSS.TYPE'),
}


@pytest.fixture(scope='module')
def palette_512(tmp_path_factory):
    path = tmp_path_factory.mktemp('palette') / 'palette_512.pt'
    torch.save(torch.rand(512, 3, generator=torch.Generator().manual_seed(0)), path)
    return str(path)


@pytest.fixture(scope='module')
def tokenizer_8192(tmp_path_factory):
    """A tiny 8192-code tokenizer (8x down-sampling, as the rows' DALL-E-scale one)."""
    path = tmp_path_factory.mktemp('tokenizer') / 'dvae_8192.safetensors'
    torch.manual_seed(0)
    save_tokenizer(DiscreteVAE(8192, 4, 4, 1, 4), str(path))
    return str(path)


def target_files(palette, tokenizer):
    return ['MODEL.SIMMIM.TARGET.PALETTE', palette, 'MODEL.SIMMIM.TARGET.TOKENIZER', tokenizer]


def flatten(node, prefix=''):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[prefix + key] = value
    return out


def test_every_table_row_has_a_config():
    counts = {
        table: len(glob.glob(os.path.join(ABLATIONS, table, '*.yaml'))) for table in TABLE_KEYS
    }
    # Table 1: 3 square + 6 block-wise + 20 random rows; Table 5 with BEiT's dVAE tokens at two
    # token sizes.
    assert counts == {
        'table1_masking': 29,
        'table2_head': 4,
        'table3_resolution': 6,
        'table4_scope': 2,
        'table5_target': 13,
    }


@pytest.mark.parametrize('path', ROWS, ids=ROW_IDS)
def test_each_row_changes_only_its_tables_option(path):
    default = flatten(load_config(DEFAULT))
    row = flatten(load_config(path))
    changed = {k for k in row if row[k] != default[k]} - {'TAG', 'OUTPUT'}
    allowed = TABLE_KEYS[os.path.basename(os.path.dirname(path))]
    assert all(k.startswith(allowed) for k in changed), changed
    assert row['TAG'].startswith('ablation__') and row['TAG'] != default['TAG']


def test_default_follows_section_4_1_1():
    config = load_config(DEFAULT, ['DATA.BATCH_SIZE', 128])
    assert (config.MODEL.TYPE, config.DATA.IMG_SIZE, config.MODEL.SWIN.WINDOW_SIZE) == (
        'swin',
        192,
        6,
    )
    assert config.MODEL.SWIN.EMBED_DIM == 128 and config.MODEL.SWIN.DEPTHS == [2, 2, 18, 2]
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS) == (100, 10)
    assert config.TRAIN.LR_SCHEDULER.NAME == 'cosine' and config.TRAIN.OPTIMIZER.NAME == 'adamw'
    assert config.TRAIN.BASE_LR * 2048 / 128 == pytest.approx(8e-4)  # at the paper's batch 2048
    assert (config.DATA.MASK_STRATEGY, config.DATA.MASK_PATCH_SIZE, config.DATA.MASK_RATIO) == (
        'random',
        32,
        0.6,
    )


_full_size_params = {}


@pytest.mark.parametrize('path', ROWS, ids=ROW_IDS)
def test_each_row_builds_its_full_size_model_and_mask_generator(path, palette_512, tokenizer_8192):
    config = load_config(path, target_files(palette_512, tokenizer_8192))
    generator = build_mask_generator(config, model_patch_size(config))
    mask = generator(torch.Generator().manual_seed(0))
    assert mask.shape == (48, 48) and mask.sum() > 0
    key = config.MODEL.dump()  # the model is a function of MODEL (and the fixed image size)
    if key not in _full_size_params:
        with torch.device('meta'):
            model = build_model(config)
        _full_size_params[key] = count_parameters(model)
    row = os.path.relpath(path, ABLATIONS)
    table2 = {
        'table2_head/linear.yaml': 89_874_104,
        'table2_head/mlp.yaml': 90_923_704,
        'table2_head/inverse_swin_t.yaml': 115_162_901,
        'table2_head/inverse_swin_b.yaml': 174_749_171,
    }
    if row in table2:  # paper: 89.9M, 90.9M, 115.2M, 174.8M
        assert _full_size_params[key] == table2[row]


@pytest.mark.parametrize('path', ROWS, ids=ROW_IDS)
def test_each_row_trains_as_a_tiny_model(path, palette_512, tokenizer_8192):
    config = load_config(path, TINY + target_files(palette_512, tokenizer_8192))
    torch.manual_seed(0)
    model = build_model(config)
    generator = build_mask_generator(config, model_patch_size(config))
    mask = torch.stack([generator(torch.Generator().manual_seed(i)) for i in range(2)])
    x = torch.randn(2, 3, 64, 64)
    loss = model(x, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder.mask_token.grad is not None
    assert model.predict_image(x, mask).shape == x.shape


def pretrain(tmp_path, cfg, *opts):
    argv = [
        '--cfg',
        cfg,
        '--output',
        str(tmp_path),
        '--opts',
        'DATA.DATASET',
        'synthetic',
        'DATA.NUM_WORKERS',
        '0',
        'DATA.BATCH_SIZE',
        '4',
        'DATA.SYNTHETIC.TRAIN_SIZE',
        '8',
        'TRAIN.EPOCHS',
        '1',
        'TRAIN.WARMUP_EPOCHS',
        '0',
        'VIS_FREQ',
        '1',
        'VIS_NUM_IMAGES',
        '2',
        *map(str, TINY),
        *map(str, opts),
    ]
    code = main_simmim.run(main_simmim.main, argv)
    tag = load_config(cfg, ['MODEL.SIMMIM.TARGET.PALETTE', 'unused']).TAG
    return code, tmp_path / 'simmim_pretrain' / tag


@pytest.mark.slow
def test_end_to_end_inverse_swin_head_with_colour_clusters_from_the_palette_tool(tmp_path):
    cfg = os.path.join(ABLATIONS, 'table5_target', 'igpt_cluster__res48.yaml')
    palette = tmp_path / 'palette.pt'
    assert (
        build_palette(
            [
                '--cfg',
                cfg,
                '--output',
                str(palette),
                '--num-colors',
                '16',
                '--num-images',
                '4',
                '--pixels-per-image',
                '64',
                '--opts',
                'DATA.DATASET',
                'synthetic',
                *map(str, TINY),
            ]
        )
        == 0
    )
    code, run_dir = pretrain(
        tmp_path,
        cfg,
        'MODEL.SIMMIM.TARGET.PALETTE',
        palette,
        'MODEL.SIMMIM.TARGET.NUM_CLUSTERS',
        16,
        'MODEL.SIMMIM.HEAD.NAME',
        'inverse_swin',
        'TENSORBOARD',
        True,
    )
    assert code == 0
    assert (run_dir / 'ckpt_epoch_0.pth').is_file()
    assert (run_dir / 'reconstructions' / 'epoch_0.png').is_file()
    assert glob.glob(str(run_dir / 'tensorboard' / 'events.out.tfevents.*'))
    assert "prediction head 'inverse_swin'" in (run_dir / 'log_rank0.txt').read_text()


@pytest.mark.slow
def test_end_to_end_dvae_tokens_with_a_tokenizer_from_the_tool(tmp_path):
    cfg = os.path.join(ABLATIONS, 'table5_target', 'dvae_tokens__res12.yaml')
    tokenizer = tmp_path / 'dvae_64.safetensors'
    flags = ['--vocab-size', '64', '--hidden-dim', '8', '--num-groups', '2', '--steps', '3']
    flags += ['--image-size', '16', '--batch-size', '4', '--device', 'cpu', '--no-progress']
    assert train_dvae(['synthetic', str(tokenizer), *flags]) == 0
    code, run_dir = pretrain(
        tmp_path,
        cfg,
        'MODEL.SIMMIM.TARGET.TOKENIZER',
        tokenizer,
        'MODEL.SIMMIM.TARGET.VOCAB_SIZE',
        64,
        'TENSORBOARD',
        False,
    )
    assert code == 0
    assert (run_dir / 'ckpt_epoch_0.pth').is_file()
    assert (run_dir / 'reconstructions' / 'epoch_0.png').is_file()


@pytest.mark.slow
def test_end_to_end_mlp_head_with_colour_bins(tmp_path):
    cfg = os.path.join(ABLATIONS, 'table2_head', 'mlp.yaml')
    code, run_dir = pretrain(
        tmp_path,
        cfg,
        'MODEL.SIMMIM.TARGET.NAME',
        'color_bins',
        'MODEL.SIMMIM.TARGET.DOWNSAMPLE',
        2,
        'TENSORBOARD',
        False,
    )
    assert code == 0
    assert (run_dir / 'ckpt_epoch_0.pth').is_file()
    assert (run_dir / 'reconstructions' / 'epoch_0.png').is_file()


# -----------------------------------------------------------------------------------------------
# Validation of the ablation keys
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'opts, message',
    [
        (['DATA.MASK_STRATEGY', 'diamond'], "DATA.MASK_STRATEGY 'diamond' is not one of"),
        (['DATA.MASK_STRATEGY', 'square', 'DATA.MASK_PATCH_SIZE', 192], 'at least 2x2'),
        (['DATA.BLOCKWISE.ASPECT_RATIO_RANGE', [2.0, 1.0]], 'ASPECT_RATIO_RANGE must be'),
        (['MODEL.SIMMIM.HEAD.NAME', 'conv'], "HEAD.NAME 'conv' is not one of"),
        (['MODEL.SIMMIM.TARGET.NAME', 'tokens'], "TARGET.NAME 'tokens' is not one of"),
        (['MODEL.SIMMIM.LOSS.TYPE', 'huber'], "LOSS.TYPE 'huber' is not one of"),
        (['MODEL.SIMMIM.LOSS.SCOPE', 'visible'], "LOSS.SCOPE 'visible' is not one of"),
        (['MODEL.SIMMIM.TARGET.DOWNSAMPLE', 3], 'DOWNSAMPLE 3 must divide the encoder stride 32'),
        (['MODEL.SIMMIM.TARGET.NAME', 'color_clusters'], 'PALETTE is empty'),
        (['MODEL.SIMMIM.TARGET.NAME', 'dvae_tokens'], 'TOKENIZER is empty'),
        (
            [
                'MODEL.SIMMIM.TARGET.NAME',
                'dvae_tokens',
                'MODEL.SIMMIM.TARGET.TOKENIZER',
                'dvae.safetensors',
                'MODEL.SIMMIM.TARGET.DOWNSAMPLE',
                32,
                'DATA.MASK_PATCH_SIZE',
                16,
            ],
            'straddle the 16-px mask patches',
        ),
        (
            ['MODEL.SIMMIM.TARGET.NAME', 'color_bins', 'MODEL.SIMMIM.NORM_TARGET.ENABLE', True],
            'cannot be combined',
        ),
        (
            ['MODEL.SIMMIM.HEAD.NAME', 'inverse_swin', 'MODEL.SIMMIM.TARGET.DOWNSAMPLE', 8],
            'doubles the resolution 3 times',
        ),
        (
            [
                'MODEL.SIMMIM.HEAD.NAME',
                'inverse_swin',
                'MODEL.SIMMIM.HEAD.INVERSE_SWIN.WINDOW_SIZE',
                5,
            ],
            'WINDOW_SIZE 5 does not tile stage 0',
        ),
    ],
)
def test_bad_ablation_values_name_the_key(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT, opts)
