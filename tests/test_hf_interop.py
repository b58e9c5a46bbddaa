"""checkpoint/hf_mapping.py, checkpoint/hf_folder.py, tools/export.py --to hf and MODEL.PRETRAINED
hf:DIR: our Swin / SwinV2 / ViT in Hugging Face transformers and back, on tiny models, offline.

What is compared (float32, CPU, eval mode, relative to the largest reference value): transformers'
reconstruction against SimMIM.reconstruct on the same images and mask (Swin pre-training), its
logits against ours (fine-tuning), BeitModel's patch tokens against our ViT encoder's, and the
stage outputs of Swin(v2)Backbone against our stages' outputs.
"""

import os

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    BeitForImageClassification,
    BeitModel,
    SwinBackbone,
    SwinForImageClassification,
    SwinForMaskedImageModeling,
    Swinv2Backbone,
    Swinv2ForImageClassification,
    Swinv2ForMaskedImageModeling,
)

from checkpoint import hf_folder
from checkpoint.hf_folder import read_hf_checkpoint
from checkpoint.weights import load_pretrained
from config import load_config_text
from models import build_model
from tests.test_timm_interop import randomize, relative_difference
from tools.export import main as export
from utils.errors import CheckpointError, IncompatibleCheckpointError

# Three stages on 64-px images: 16, 8 and 4-patch maps, none smaller than the 4-patch window.
SWIN = (
    'MODEL:\n  TYPE: {type}\n{classes}  {key}:\n    EMBED_DIM: 16\n    DEPTHS: [1, 2, 1]\n'
    '    NUM_HEADS: [1, 2, 2]\n    WINDOW_SIZE: 4\n{extra}DATA:\n  IMG_SIZE: 64\n'
    '  MASK_PATCH_SIZE: 16\n'
)
EXTRA = {'swin': '', 'swinv2': '    PRETRAINED_WINDOW_SIZES: [3, 3, 0]\n'}
MIM = {'swin': SwinForMaskedImageModeling, 'swinv2': Swinv2ForMaskedImageModeling}
CLASSIFIER = {'swin': SwinForImageClassification, 'swinv2': Swinv2ForImageClassification}
BACKBONE = {'swin': SwinBackbone, 'swinv2': Swinv2Backbone}
NUM_CLASSES = 5
REBUILT = ('relative_position_index', 'relative_coords_table', 'attn_mask')
pytestmark = pytest.mark.usefixtures('single_thread')


def config_text(model_type, pretrain, extra=''):
    return SWIN.format(
        type=model_type,
        key=model_type.upper(),
        classes='' if pretrain else f'  NUM_CLASSES: {NUM_CLASSES}\n',
        extra=EXTRA[model_type] + extra,
    )


def make_checkpoint(tmp_path, model_type, pretrain, extra=''):
    config = load_config_text(config_text(model_type, pretrain, extra), is_pretrain=pretrain)
    model = randomize(build_model(config, is_pretrain=pretrain))
    path = str(tmp_path / f'{model_type}_{pretrain}.pth')
    torch.save({'model': model.state_dict(), 'config': config.dump(), 'epoch': 3}, path)
    return config, model, path


def from_pretrained(cls, folder, **kwargs):
    model, info = cls.from_pretrained(
        folder, local_files_only=True, output_loading_info=True, **kwargs
    )
    return model.eval(), info


def inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    mask = (torch.rand(2, 16, 16, generator=generator) < 0.6).float()  # at the 4-px patch size
    return x, mask


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_pretraining_export_is_transformers_mim_with_our_reconstruction(tmp_path, model_type):
    _, simmim, path = make_checkpoint(tmp_path, model_type, pretrain=True)
    out = tmp_path / 'hf'
    assert export([path, '--to', 'hf', str(out)]) == 0
    assert {'config.json', 'model.safetensors', 'preprocessor_config.json'} <= set(os.listdir(out))
    model, info = from_pretrained(MIM[model_type], str(out))
    assert not info['missing_keys'] and not info['unexpected_keys']
    assert not info['mismatched_keys']
    x, mask = inputs()
    with torch.no_grad():
        expected = simmim.reconstruct(x, mask)
        got = model(pixel_values=x, bool_masked_pos=mask.flatten(1).bool()).reconstruction
        other_mask = model(pixel_values=x, bool_masked_pos=(1 - mask).flatten(1).bool())
    assert relative_difference(got, expected) < 1e-4
    assert relative_difference(other_mask.reconstruction, expected) > 1e-2  # the mask matters
    assert model.config.encoder_stride == 16 and model.config.window_size == 4


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_finetuned_export_is_transformers_classifier_with_our_logits(tmp_path, model_type):
    _, classifier, path = make_checkpoint(tmp_path, model_type, pretrain=False)
    out = tmp_path / 'hf'
    assert export([path, '--to', 'hf', str(out)]) == 0
    model, info = from_pretrained(CLASSIFIER[model_type], str(out))
    assert not info['missing_keys'] and not info['unexpected_keys']
    assert model.config.num_labels == NUM_CLASSES
    x, _ = inputs()
    with torch.no_grad():
        assert relative_difference(model(pixel_values=x).logits, classifier(x)) < 1e-4
    processor = AutoImageProcessor.from_pretrained(str(out), local_files_only=True)
    assert processor.crop_size == {'height': 64, 'width': 64}  # TEST.CROP: resize 73, crop 64
    assert processor.size == {'shortest_edge': 73}


@pytest.mark.parametrize('pretrain', [True, False])
@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_ours_to_transformers_to_ours_gives_identical_tensors(tmp_path, model_type, pretrain):
    _, model, path = make_checkpoint(tmp_path, model_type, pretrain)
    assert export([path, '--to', 'hf', str(tmp_path / 'hf')]) == 0
    back = read_hf_checkpoint(str(tmp_path / 'hf'), model_type)['model']
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith(REBUILT)}
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def our_stage_outputs(encoder, x):
    """Each stage's tokens before its patch merging, as (B, C, h, w) maps."""
    tokens = encoder.patch_embed(x)
    grid = x.shape[-1] // encoder.patch_size
    maps = []
    for i, layer in enumerate(encoder.layers):
        for block in layer.blocks:
            tokens = block(tokens)
        side = grid // 2**i
        maps.append(tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side))
        if layer.downsample is not None:
            tokens = layer.downsample(tokens)
    return maps


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_the_export_loads_into_the_backbone_with_our_feature_maps(tmp_path, model_type):
    _, simmim, path = make_checkpoint(tmp_path, model_type, pretrain=True)
    assert export([path, '--to', 'hf', str(tmp_path / 'hf')]) == 0
    stages = ['stage1', 'stage2', 'stage3']
    backbone, info = from_pretrained(
        BACKBONE[model_type], str(tmp_path / 'hf'), out_features=stages
    )
    x, _ = inputs()
    with torch.no_grad():
        got = backbone(pixel_values=x).feature_maps
        expected = our_stage_outputs(simmim.encoder, x)
    if model_type == 'swin':
        # SwinBackbone adds a LayerNorm per output stage (as detection heads do), new at (1, 0).
        assert sorted(info['missing_keys']) == sorted(
            f'hidden_states_norms.{s}.{p}' for s in stages for p in ('weight', 'bias')
        )
        expected = [
            torch.nn.functional.layer_norm(m.permute(0, 2, 3, 1), m.shape[1:2]).permute(0, 3, 1, 2)
            for m in expected
        ]
    else:
        assert not info['missing_keys']
    assert len(got) == 3
    for g, e in zip(got, expected, strict=True):
        assert relative_difference(g, e) < 1e-4


def test_pretrained_hf_folder_starts_finetuning_and_pretraining(tmp_path):
    _, source, path = make_checkpoint(tmp_path, 'swinv2', pretrain=True)
    assert export([path, '--to', 'hf', str(tmp_path / 'hf')]) == 0
    for pretrain in (False, True):
        loaded = []
        for spec in (f'hf:{tmp_path / "hf"}', path):  # the same report and weights as our file
            opts = ['MODEL.PRETRAINED', spec]
            config = load_config_text(config_text('swinv2', pretrain), opts, is_pretrain=pretrain)
            model = build_model(config, is_pretrain=pretrain)
            target = model.encoder if pretrain else model
            report = load_pretrained(config, target)
            loaded.append((report, target.state_dict()))
        (report, weights), (reference, reference_weights) = loaded
        assert report == reference and report.num_loaded > 30
        expected = source.encoder.state_dict()
        for key, value in weights.items():
            if key not in report.missing_keys and not key.endswith(REBUILT):
                assert torch.equal(value, reference_weights[key]), key
                assert torch.equal(value, expected[key]), key


def test_a_folder_of_another_architecture_is_refused(tmp_path):
    _, _, path = make_checkpoint(tmp_path, 'swin', pretrain=False)
    assert export([path, '--to', 'hf', str(tmp_path / 'hf')]) == 0
    with pytest.raises(IncompatibleCheckpointError, match='MODEL.TYPE swinv2'):
        read_hf_checkpoint(str(tmp_path / 'hf'), 'swinv2')


REFUSED = {
    'absolute embedding': (
        'swin',
        lambda t: t.replace('WINDOW_SIZE: 4\n', 'WINDOW_SIZE: 4\n    APE: True\n'),
        'MODEL.SWIN.APE',
    ),
    'a stage smaller than the window': (
        'swinv2',
        lambda t: t.replace('IMG_SIZE: 64', 'IMG_SIZE: 32'),
        'smaller than the window',
    ),
    'another head': (
        'swin',
        lambda t: t.replace('MODEL:\n', 'MODEL:\n  SIMMIM:\n    HEAD:\n      NAME: mlp\n', 1),
        'MODEL.SIMMIM.HEAD.NAME mlp',
    ),
}


@pytest.mark.parametrize('case', list(REFUSED))
def test_what_transformers_cannot_hold_is_refused_and_an_earlier_export_kept(
    tmp_path, capsys, case
):
    model_type, edit, message = REFUSED[case]
    out = tmp_path / 'hf'
    (tmp_path / 'good').mkdir()
    _, _, good = make_checkpoint(tmp_path / 'good', model_type, pretrain=True)
    assert export([good, '--to', 'hf', str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    config = load_config_text(edit(config_text(model_type, True)), is_pretrain=True)
    model = randomize(build_model(config, is_pretrain=True))
    bad = str(tmp_path / 'bad.pth')
    torch.save({'model': model.state_dict(), 'config': config.dump()}, bad)
    capsys.readouterr()
    assert export([bad, '--to', 'hf', str(out)]) == 2
    assert message in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert [n for n in os.listdir(tmp_path) if n.startswith('.hf.export-')] == []


def test_an_export_that_does_not_reproduce_the_model_is_not_published(
    tmp_path, capsys, monkeypatch
):
    _, _, path = make_checkpoint(tmp_path, 'swin', pretrain=False)
    monkeypatch.setattr(hf_folder, 'output_difference', lambda *args: 0.5)
    assert export([path, '--to', 'hf', str(tmp_path / 'hf')]) == 1
    assert 'differs from ours by 5.0e-01' in capsys.readouterr().err
    assert not (tmp_path / 'hf').exists()


# ------------------------------------------------------------------------------------------------
# ViT -> BeitModel / BeitForImageClassification
# ------------------------------------------------------------------------------------------------
VIT = (
    'MODEL:\n  TYPE: vit\n{classes}  VIT:\n    PATCH_SIZE: 8\n    EMBED_DIM: 24\n    DEPTH: 2\n'
    '    NUM_HEADS: 2\n{extra}DATA:\n  IMG_SIZE: 32\n  MASK_PATCH_SIZE: 16\n'
)
VIT_VARIANTS = {
    'shared_rpb': '',
    'rpb_mean_pooling': (
        '    USE_RPB: True\n    USE_SHARED_RPB: False\n    USE_MEAN_POOLING: True\n'
    ),
    'ape': '    USE_APE: True\n    USE_SHARED_RPB: False\n    INIT_VALUES: None\n',
}


@pytest.mark.parametrize('variant', list(VIT_VARIANTS))
def test_vit_exports_as_beit_with_our_features_logits_and_round_trip(tmp_path, variant):
    outputs = {}
    for pretrain in (True, False):
        text = VIT.format(
            classes='' if pretrain else f'  NUM_CLASSES: {NUM_CLASSES}\n',
            extra=VIT_VARIANTS[variant],
        )
        config = load_config_text(text, is_pretrain=pretrain)
        model = randomize(build_model(config, is_pretrain=pretrain))
        path = str(tmp_path / f'{pretrain}.pth')
        torch.save({'model': model.state_dict(), 'config': config.dump()}, path)
        out = str(tmp_path / f'hf_{pretrain}')
        assert export([path, '--to', 'hf', out]) == 0
        cls = BeitModel if pretrain else BeitForImageClassification
        hf_model, info = from_pretrained(cls, out)
        assert not info['missing_keys'] and not info['unexpected_keys']
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(2, 3, 32, 32, generator=generator)
        mask = (torch.rand(2, 4, 4, generator=generator) < 0.5).float()
        with torch.no_grad():
            if pretrain:
                expected = model.encoder(x, mask).flatten(2).transpose(1, 2)  # patch tokens
                got = hf_model(pixel_values=x, bool_masked_pos=mask.flatten(1).bool())
                got = got.last_hidden_state[:, 1:]
            else:
                expected, got = model(x), hf_model(pixel_values=x).logits
        outputs[pretrain] = relative_difference(got, expected)
        back = read_hf_checkpoint(out, 'vit')['model']
        ours = {
            k: v
            for k, v in model.state_dict().items()
            if not k.endswith(REBUILT) and not k.startswith('decoder.')  # BeitModel: no decoder
        }
        assert back.keys() == ours.keys()
        assert all(torch.equal(back[k], ours[k]) for k in ours)
    assert outputs[True] < 1e-4 and outputs[False] < 1e-4


def test_a_missing_or_damaged_folder_names_the_problem(tmp_path):
    _, _, path = make_checkpoint(tmp_path, 'swin', pretrain=False)
    assert export([path, '--to', 'hf', str(tmp_path / 'hf')]) == 0
    with pytest.raises(CheckpointError, match='has no config.json'):
        read_hf_checkpoint(str(tmp_path / 'nowhere'), 'swin')
    weights = tmp_path / 'hf' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a cut-off copy
    with pytest.raises(CheckpointError, match='the weights file'):
        read_hf_checkpoint(str(tmp_path / 'hf'), 'swin')
