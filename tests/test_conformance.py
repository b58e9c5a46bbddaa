"""models/ against the official SimMIM / Swin-Transformer code: tiny random-weight models whose
official outputs are stored in shared/reference/fixtures (see its README)."""
import os

import pytest
import torch

from config import load_config
from models import build_model
from tests.conftest import FIXTURES_DIR

FIXTURES = os.path.join(FIXTURES_DIR, '{}_dev.pt')
DERIVED_BUFFERS = ('relative_position_index', 'relative_coords_table', 'attn_mask')


@pytest.fixture(scope='module', params=['swin', 'vit', 'swinv2'])
def fixture(request):
    return torch.load(FIXTURES.format(request.param), weights_only=True)


def build_from_yaml(tmp_path, yaml_text, is_pretrain):
    path = tmp_path / 'config.yaml'
    path.write_text(yaml_text)
    return build_model(load_config(str(path), is_pretrain=is_pretrain), is_pretrain=is_pretrain)


def load_official(model, state_dict):
    """Load strictly: the fixtures leave out only the buffers our models rebuild."""
    result = model.load_state_dict(state_dict, strict=False)
    assert all(key.endswith(DERIVED_BUFFERS) for key in result.missing_keys), result.missing_keys
    assert not result.unexpected_keys
    model.load_state_dict(state_dict, strict=True)  # rebuilt buffers are not in our state dict
    return model.eval()


def assert_close_relative(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def test_pretraining_loss_and_reconstruction_match_official(fixture, tmp_path):
    model = load_official(build_from_yaml(tmp_path, fixture['pretrain_yaml'], True),
                          fixture['pretrain_state_dict'])
    x, mask = fixture['x'], fixture['mask']
    with torch.no_grad():
        loss, x_rec = model(x, mask), model.reconstruct(x, mask)
    assert loss.item() == pytest.approx(fixture['loss'].item(), rel=1e-5)
    assert_close_relative(x_rec, fixture['x_rec'])  # raw decoder output, also under NORM_TARGET


def test_finetuning_logits_match_official(fixture, tmp_path):
    model = load_official(build_from_yaml(tmp_path, fixture['finetune_yaml'], False),
                          fixture['finetune_state_dict'])
    with torch.no_grad():
        logits = model(fixture['x_ft'])
    assert_close_relative(logits, fixture['logits'])


def test_official_state_dict_with_derived_buffers_loads_strictly(fixture, tmp_path):
    """Official checkpoints also carry the index/mask/coordinate buffers: dropped on load."""
    model = build_from_yaml(tmp_path, fixture['pretrain_yaml'], True)
    official = dict(fixture['pretrain_state_dict'], **dict(model.named_buffers()))
    result = model.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
