"""models/ against the official SimMIM / Swin-Transformer code: tiny models filled by the seeded
rule of tests/fixtures/README.md, whose official outputs are stored there."""

import pytest
import torch

from tests.fixture_rule import NAMES, build_from_yaml, official_data

DERIVED_BUFFERS = ('relative_position_index', 'relative_coords_table', 'attn_mask')


@pytest.fixture(scope='module', params=NAMES)
def fixture(request):
    return official_data(request.param)


def load_official(yaml_text, is_pretrain, state_dict):
    """The fixture's model with `state_dict` loaded strictly (the rule names every parameter)."""
    _, model = build_from_yaml(yaml_text, is_pretrain)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def assert_close_relative(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def test_pretraining_loss_and_reconstruction_match_official(fixture):
    model = load_official(fixture['pretrain_yaml'], True, fixture['pretrain_state_dict'])
    x, mask = fixture['x'], fixture['mask']
    with torch.no_grad():
        loss, x_rec = model(x, mask), model.reconstruct(x, mask)
    assert loss.item() == pytest.approx(fixture['loss'].item(), rel=1e-5)
    # The raw decoder output (also under NORM_TARGET): every 4th pixel, and sums over all pixels
    # (the plain sum is compared on the scale of the absolute sum: it may nearly cancel).
    assert x_rec.shape == fixture['x'].shape
    assert_close_relative(x_rec[:, :, ::4, ::4], fixture['x_rec_every4'])
    abs_sum = fixture['x_rec_abs_sum'].item()
    assert x_rec.double().abs().sum().item() == pytest.approx(abs_sum, rel=1e-5)
    assert x_rec.double().sum().item() == pytest.approx(
        fixture['x_rec_sum'].item(), abs=1e-5 * abs_sum
    )


def test_finetuning_logits_match_official(fixture):
    model = load_official(fixture['finetune_yaml'], False, fixture['finetune_state_dict'])
    with torch.no_grad():
        logits = model(fixture['x_ft'])
    assert_close_relative(logits, fixture['logits'])


@pytest.mark.parametrize('which', ['pretrain', 'finetune'])
def test_official_state_dict_with_derived_buffers_loads_strictly(fixture, which):
    """Official checkpoints also carry the index/mask/coordinate buffers: dropped on load."""
    _, model = build_from_yaml(fixture[f'{which}_yaml'], which == 'pretrain')
    derived = {k: v for k, v in model.named_buffers() if k.endswith(DERIVED_BUFFERS)}
    assert derived
    official = dict(fixture[f'{which}_state_dict'], **derived)
    result = model.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
