"""models/timm_mapping.py, checkpoint/timm_folder.py, tools/export.py --to timm and
tools/import_timm.py: our encoders in timm and back, on tiny models of every architecture.

What is compared (float32, CPU, eval mode, relative to the largest reference value):
- pre-training checkpoints: timm's forward_features (Swin: the NHWC map after the final norm;
  Beit: all tokens after the final norm) against our SimMIM encoder's output with nothing masked
  (Swin: the NCHW map, permuted; ViT: the patch tokens, the cls token being dropped by ours);
- fine-tuning checkpoints: timm's forward_features against our final tokens (forward_tokens of
  the patch embedding, Swin reshaped to NHWC), timm's pooled pre-logits against our
  forward_features, and the logits.
"""

import json
import os
import re

import pytest
import timm
import torch

from config import load_config_text
from models import build_model
from tools import export as export_tool
from tools.export import main as export
from tools.import_timm import main as import_timm
from utils.safe_load import load_checkpoint_file

SWIN = (
    '  {key}:\n    EMBED_DIM: 16\n    DEPTHS: [1, 2, 1, 1]\n    NUM_HEADS: [1, 2, 2, 2]\n'
    '    WINDOW_SIZE: 4\n{extra}DATA:\n  IMG_SIZE: 64\n  MASK_PATCH_SIZE: 16\n'
)
VIT = (
    '  VIT:\n    PATCH_SIZE: 8\n    EMBED_DIM: 24\n    DEPTH: 2\n    NUM_HEADS: 2\n{extra}'
    'DATA:\n  IMG_SIZE: 32\n  MASK_PATCH_SIZE: 16\n'
)
# Stage 2 and 3 maps (4x4, 2x2) are no larger than the window: the clamped windows are covered.
CONFIGS = {
    'swin': 'MODEL:\n  TYPE: swin\n' + SWIN.format(key='SWIN', extra=''),
    'swinv2': 'MODEL:\n  TYPE: swinv2\n'
    + SWIN.format(key='SWINV2', extra='    PRETRAINED_WINDOW_SIZES: [3, 3, 2, 0]\n'),
    'vit': 'MODEL:\n  TYPE: vit\n' + VIT.format(extra=''),  # shared RPB, cls pooling: beit_*
    'vit_rpb': 'MODEL:\n  TYPE: vit\n'
    + VIT.format(
        extra='    USE_RPB: True\n    USE_SHARED_RPB: False\n    USE_MEAN_POOLING: True\n'
    ),
    'vit_plain': 'MODEL:\n  TYPE: vit\n'
    + VIT.format(  # no relative bias at all: vit_*
        extra='    USE_APE: True\n    USE_SHARED_RPB: False\n    USE_MEAN_POOLING: True\n'
    ),
}
TIMM_CLASS = {
    'swin': 'SwinTransformer',
    'swinv2': 'SwinTransformerV2',
    'vit': 'Beit',
    'vit_rpb': 'Beit',
    'vit_plain': 'VisionTransformer',
}
NUM_CLASSES = 5
pytestmark = pytest.mark.usefixtures('single_thread')


def randomize(model, seed=0):
    """Every parameter drawn at random, so LayerNorm weights, biases, layer scales, position tables
    are not at their (often 0 or 1) initial values and a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def make_checkpoint(tmp_path, name, pretrain):
    text = (
        CONFIGS[name]
        if pretrain
        else CONFIGS[name].replace('MODEL:\n', f'MODEL:\n  NUM_CLASSES: {NUM_CLASSES}\n', 1)
    )
    config = load_config_text(text, is_pretrain=pretrain)
    model = randomize(build_model(config, is_pretrain=pretrain))
    path = str(tmp_path / f'{name}.pth')
    torch.save({'model': model.state_dict(), 'config': config.dump(), 'epoch': 7}, path)
    return config, model, path


def relative_difference(got, expected):
    assert got.shape == expected.shape
    return ((got - expected).abs().max() / expected.abs().max()).item()


def export_and_load(path, out_dir):
    assert export([path, '--to', 'timm', str(out_dir)]) == 0
    return timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()


def images(config, seed=1):
    size = config.DATA.IMG_SIZE
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', ['swin', 'swinv2', 'vit'])
def test_pretraining_encoder_exported_to_timm_gives_our_features(tmp_path, name):
    config, simmim, path = make_checkpoint(tmp_path, name, pretrain=True)
    timm_model = export_and_load(path, tmp_path / 'timm')
    assert type(timm_model).__name__ == TIMM_CLASS[name] and timm_model.num_classes == 0
    x = images(config)
    encoder = simmim.encoder
    grid = config.DATA.IMG_SIZE // encoder.patch_size
    with torch.no_grad():
        feature_map = encoder(x, torch.zeros(x.shape[0], grid, grid))  # (B, C, h, w), no mask
        features = timm_model.forward_features(x)
    if name == 'vit':
        expected, got = feature_map.flatten(2).transpose(1, 2), features[:, 1:]
    else:
        expected, got = feature_map.permute(0, 2, 3, 1), features
    assert relative_difference(got, expected) < 1e-5


def test_a_timm_export_that_does_not_reproduce_the_model_is_not_published(
    tmp_path, capsys, monkeypatch
):
    _, _, path = make_checkpoint(tmp_path, 'vit', pretrain=False)
    monkeypatch.setattr(export_tool, 'output_difference', lambda *args: 0.5)
    assert export([path, '--to', 'timm', str(tmp_path / 'timm')]) == 1
    assert "timm model's output differs from ours by 5.0e-01" in capsys.readouterr().err
    assert not (tmp_path / 'timm').exists()
    assert export([path, '--to', 'timm', str(tmp_path / 'timm'), '--no-verify']) == 0
    assert sorted(os.listdir(tmp_path / 'timm')) == ['config.json', 'model.safetensors']


@pytest.mark.parametrize('name', list(CONFIGS))
def test_finetuned_classifier_exported_to_timm_gives_our_features_and_logits(tmp_path, name):
    config, model, path = make_checkpoint(tmp_path, name, pretrain=False)
    timm_model = export_and_load(path, tmp_path / 'timm')
    assert type(timm_model).__name__ == TIMM_CLASS[name]
    assert timm_model.num_classes == NUM_CLASSES
    x = images(config)
    with torch.no_grad():
        tokens = model.forward_tokens(model.patch_embed(x))
        features = timm_model.forward_features(x)
        if not name.startswith('vit'):
            tokens = tokens.reshape(features.shape)  # (B, h*w, C) -> NHWC, row-major like timm
        pooled = timm_model.forward_head(features, pre_logits=True)
        pairs = [(features, tokens), (pooled, model.forward_features(x)), (timm_model(x), model(x))]
    for got, expected in pairs:
        assert relative_difference(got, expected) < 1e-5


def test_timm_folder_config_is_timm_format_with_our_preprocessing(tmp_path):
    _, _, path = make_checkpoint(tmp_path, 'swinv2', pretrain=False)
    export([path, '--to', 'timm', str(tmp_path / 'timm')])
    with open(tmp_path / 'timm' / 'config.json') as f:
        hf_config = json.load(f)
    assert hf_config['architecture'].startswith('swinv2_')
    assert hf_config['num_classes'] == NUM_CLASSES
    args = hf_config['model_args']
    assert (args['embed_dim'], args['depths'], args['window_size']) == (16, [1, 2, 1, 1], 4)
    assert args['pretrained_window_sizes'] == [3, 3, 2, 0] and args['img_size'] == [64, 64]
    cfg = hf_config['pretrained_cfg']
    assert cfg['input_size'] == [3, 64, 64] and cfg['crop_pct'] == 0.875
    assert cfg['interpolation'] == 'bicubic' and cfg['crop_mode'] == 'center'
    assert cfg['mean'] == [0.485, 0.456, 0.406] and cfg['std'] == [0.229, 0.224, 0.225]
    assert 'license' not in cfg and cfg['tag'] == 'simmim'
    assert sorted(os.listdir(tmp_path / 'timm')) == ['config.json', 'model.safetensors']


def test_pretraining_export_leaves_out_decoder_and_mask_token(tmp_path):
    _, _, path = make_checkpoint(tmp_path, 'swin', pretrain=True)
    export([path, '--to', 'timm', str(tmp_path / 'timm')])
    with open(tmp_path / 'timm' / 'config.json') as f:
        left_out = json.load(f)['simmim']['left_out']
    assert sorted(left_out) == ['decoder.0.bias', 'decoder.0.weight', 'encoder.mask_token']


# -----------------------------------------------------------------------------------------------
# timm -> our layout -> timm
# -----------------------------------------------------------------------------------------------
TIMM_MODELS = {
    'swin': (
        'swin_tiny_patch4_window7_224',
        dict(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 2), window_size=4),
    ),
    'swinv2': (
        'swinv2_tiny_window8_256',
        dict(
            img_size=64,
            embed_dim=16,
            depths=(1, 2, 1, 1),
            num_heads=(1, 2, 2, 2),
            window_size=4,
            pretrained_window_sizes=(3, 3, 2, 0),
        ),
    ),
    'beit': (
        'beit_base_patch16_224',
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=24,
            depth=2,
            num_heads=2,
            use_rel_pos_bias=True,
            init_values=0.1,
        ),
    ),
    'vit': (
        'vit_base_patch16_224',
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=24,
            depth=2,
            num_heads=2,
            init_values=0.1,
            global_pool='avg',
        ),
    ),
}


def timm_folder(tmp_path, name, zero_key_bias=True):
    architecture, args = TIMM_MODELS[name]
    model = randomize(timm.create_model(architecture, num_classes=NUM_CLASSES, **args))
    if zero_key_bias:  # our layout has no key bias (see test_timm_vit_key_bias_...)
        for block in getattr(model, 'blocks', []):
            if block.attn.qkv.bias is not None:
                dim = block.attn.qkv.bias.shape[0] // 3
                block.attn.qkv.bias.data[dim : 2 * dim] = 0
    folder = str(tmp_path / f'timm_{name}')
    timm.models.save_for_hf(model, folder, model_args=args, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize('name', list(TIMM_MODELS))
def test_timm_to_our_layout_to_timm_gives_identical_tensors(tmp_path, name):
    _, source = timm_folder(tmp_path, name)
    ours = str(tmp_path / 'ours.safetensors')
    assert import_timm([source, ours]) == 0
    assert export([ours, '--to', 'timm', str(tmp_path / 'back')]) == 0
    before = load_checkpoint_file(os.path.join(source, 'model.safetensors'))['model']
    after = load_checkpoint_file(str(tmp_path / 'back' / 'model.safetensors'))['model']
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The same model: the same class and arguments, hence bit-identical outputs.
    a = timm.create_model(f'local-dir:{source}', pretrained=True).eval()
    b = timm.create_model(f'local-dir:{tmp_path / "back"}', pretrained=True).eval()
    assert type(a) is type(b)
    x = torch.randn(2, 3, a.patch_embed.img_size[0], a.patch_embed.img_size[1])
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_imported_timm_model_gives_timm_outputs_in_our_model(tmp_path):
    timm_model, source = timm_folder(tmp_path, 'swinv2')
    ours = str(tmp_path / 'ours.pth')
    import_timm([source, ours])
    checkpoint = load_checkpoint_file(ours)
    config = load_config_text(checkpoint['config'])
    assert config.MODEL.TYPE == 'swinv2' and config.MODEL.NUM_CLASSES == NUM_CLASSES
    assert list(config.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES) == [3, 3, 2, 0]
    model = build_model(config, is_pretrain=False).eval()
    model.load_state_dict(checkpoint['model'])
    x = images(config)
    with torch.no_grad():
        assert relative_difference(model(x), timm_model.eval()(x)) < 1e-5


def test_timm_vit_key_bias_is_dropped_without_changing_outputs(tmp_path):
    # softmax(q.k + q.b_k) over keys equals softmax(q.k): a key bias shifts a whole row.
    timm_model, source = timm_folder(tmp_path, 'vit', zero_key_bias=False)
    assert timm_model.blocks[0].attn.qkv.bias[24:48].abs().sum() > 0
    ours = str(tmp_path / 'ours.pth')
    import_timm([source, ours])
    checkpoint = load_checkpoint_file(ours)
    config = load_config_text(checkpoint['config'])
    model = build_model(config, is_pretrain=False).eval()
    model.load_state_dict(checkpoint['model'])
    x = images(config)
    with torch.no_grad():
        assert relative_difference(model(x), timm_model(x)) < 1e-5


@pytest.mark.parametrize(
    'architecture, args, message',
    [
        ('test_resnet', {}, 'has no counterpart here'),
        (
            'vit_base_patch16_224',
            dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, reg_tokens=1),
            'register tokens',
        ),
        (
            'beit_base_patch16_224',
            dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, scale_mlp=True),
            'unexpected: blocks.*.mlp.norm.weight',
        ),
    ],
)
def test_timm_model_our_layout_cannot_hold_is_refused_and_nothing_written(
    tmp_path, capsys, architecture, args, message
):
    folder = str(tmp_path / 'timm')
    timm.models.save_for_hf(
        timm.create_model(architecture, num_classes=0, **args),
        folder,
        model_args=args,
        safe_serialization=True,
    )
    assert import_timm([folder, str(tmp_path / 'ours.pth')]) == 2
    err = capsys.readouterr().err
    assert re.match(r'(Configuration |Checkpoint )?[Ee]rror: ', err) and message in err, err
    assert not os.path.exists(tmp_path / 'ours.pth')


def test_import_refuses_what_it_cannot_write_and_keeps_an_earlier_file(tmp_path, capsys):
    _, source = timm_folder(tmp_path, 'swin')
    earlier = tmp_path / 'ours.pth'
    assert import_timm([source, str(earlier)]) == 0
    before = earlier.read_bytes()
    (tmp_path / 'folder.pth').mkdir()
    cases = [
        (str(tmp_path / 'ours.txt'), r'suffix.*\.safetensors, \.pth, \.pt'),
        (str(tmp_path / 'ours.ckpt'), r'suffix.*\.safetensors, \.pth, \.pt'),
        (str(tmp_path / 'folder.pth'), 'is an existing folder; pass a file path'),
    ]
    for out, message in cases:
        assert import_timm([source, out]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith('Configuration error: ') and re.search(message, err), err
        assert 'disk' not in err
    assert sorted(os.listdir(tmp_path)) == sorted(
        ['timm_swin', 'ours.pth', 'ours.pth.checksum', 'folder.pth']
    )
    assert os.listdir(tmp_path / 'folder.pth') == []
    # Weights holding NaN or Inf are bad input too, and the earlier file stays.
    model, source = timm_folder(tmp_path / 'nan', 'swin')
    state = model.state_dict()
    state['head.fc.weight'][0, 0] = float('inf')
    state['layers.0.blocks.0.attn.qkv.weight'][1, 1] = float('nan')
    model.load_state_dict(state)
    timm.models.save_for_hf(
        model, source, model_args=TIMM_MODELS['swin'][1], safe_serialization=True
    )
    assert import_timm([source, str(earlier)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('Checkpoint error: ') and 'NaN or infinite values in 2 tensors' in err
    assert earlier.read_bytes() == before


def test_import_of_a_truncated_model_safetensors_names_the_file(tmp_path, capsys):
    _, source = timm_folder(tmp_path, 'swin')
    weights = os.path.join(source, 'model.safetensors')
    with open(weights, 'rb') as f:
        data = f.read()
    for cut in (len(data) - 1, 100, 5):  # the tensors, the header, the header's length cut short
        with open(weights, 'wb') as f:
            f.write(data[:cut])
        assert import_timm([source, str(tmp_path / 'ours.safetensors')]) == 2
        err = capsys.readouterr().err
        assert err.startswith('Checkpoint error: ') and 'Traceback' not in err
        assert f'{weights} ({cut} bytes) is truncated or damaged' in err, err
        assert not os.path.exists(tmp_path / 'ours.safetensors')
