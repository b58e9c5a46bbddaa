"""models/heads.py: every head's output shape and parameter count (Table 2), and build_decoder."""

import logging

import pytest
import torch

from config import get_defaults
from models import build_model
from models.heads import HEADS, InverseSwinHead, LinearHead, MLPHead, PatchExpand, count_parameters
from tests.test_models import tiny_config


def swin_block_params(dim, window, heads):
    """LayerNorms 2 * 2d, qkv 3d^2 + 3d, proj d^2 + d, MLP (4d^2 + 4d) + (4d^2 + d), and the
    relative position table (2w - 1)^2 x heads."""
    return 12 * dim**2 + 13 * dim + (2 * window - 1) ** 2 * heads


@pytest.mark.parametrize('upscale', [1, 4, 32])
def test_linear_head_shape_and_parameters(upscale):
    head = LinearHead(16, 3, upscale)
    assert head(torch.randn(2, 16, 3, 3)).shape == (2, 3, 3 * upscale, 3 * upscale)
    assert count_parameters(head) == (16 + 1) * upscale**2 * 3


@pytest.mark.parametrize('hidden, out_channels, upscale', [(None, 3, 8), (24, 24, 2)])
def test_mlp_head_shape_and_parameters(hidden, out_channels, upscale):
    head = MLPHead(16, out_channels, upscale, hidden)
    width = hidden or 16
    assert head(torch.randn(2, 16, 3, 3)).shape == (2, out_channels, 3 * upscale, 3 * upscale)
    assert count_parameters(head) == (16 + 1) * width + (width + 1) * upscale**2 * out_channels


def test_patch_expand_places_each_token_in_its_neighbourhood():
    expand = PatchExpand((1, 2), dim=1, out_dim=1, scale=2)
    with torch.no_grad():
        expand.expand.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    expand.norm = torch.nn.Identity()
    x = torch.tensor([[[1.0], [10.0]]])  # (B=1, 1x2 tokens, 1 channel)
    out = expand(x).view(2, 4)
    assert out.tolist() == [[1, 2, 10, 20], [3, 4, 30, 40]]


@pytest.mark.parametrize('upscale, out_channels', [(8, 3), (4, 24), (2, 5)])
def test_inverse_swin_head_shape(upscale, out_channels):
    head = InverseSwinHead(
        16,
        out_channels,
        upscale,
        (2, 2),
        embed_dim=4,
        depths=(1, 2),
        num_heads=(2, 1),
        window_size=2,
    )
    assert head(torch.randn(2, 16, 2, 2)).shape == (2, out_channels, 2 * upscale, 2 * upscale)


def test_inverse_swin_head_parameter_count():
    """in 16 -> proj to 8; stage 0 (8 ch, 2x2) expand to 4 ch; stage 1 (4 ch, 4x4); norm; final
    x4 expand (4 -> 16 * 4, norm); linear to 3."""
    head = InverseSwinHead(
        16, 3, 8, (2, 2), embed_dim=4, depths=(1, 1), num_heads=(1, 1), window_size=2
    )
    expected = (
        16 * 8
        + 8
        + swin_block_params(8, 2, 1)
        + 8 * 4 * 4
        + 2 * 4
        + swin_block_params(4, 2, 1)
        + 2 * 4
        + 4 * 16 * 4
        + 2 * 4
        + 4 * 3
        + 3
    )
    assert count_parameters(head) == expected


def test_inverse_swin_head_rejects_an_upscale_its_stages_cannot_reach():
    with pytest.raises(ValueError, match='multiple of 8'):
        InverseSwinHead(16, 3, 4, (2, 2), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def tiny_swin(head, **target):
    config = get_defaults()
    config.DATA.IMG_SIZE = 32
    config.MODEL.SWIN.update(EMBED_DIM=8, DEPTHS=[1, 1, 1], NUM_HEADS=[1, 1, 1], WINDOW_SIZE=2)
    config.MODEL.SIMMIM.HEAD.NAME = head
    config.MODEL.SIMMIM.HEAD.INVERSE_SWIN.update(
        EMBED_DIM=4, DEPTHS=[1, 1, 1], NUM_HEADS=[1, 1, 1], WINDOW_SIZE=2
    )
    config.MODEL.SIMMIM.TARGET.update(target)
    return config


@pytest.mark.parametrize('head', sorted(HEADS))
@pytest.mark.parametrize(
    'target', [dict(), dict(DOWNSAMPLE=4), dict(NAME='color_bins', NUM_BINS=8)]
)
def test_build_decoder_sizes_every_head_for_the_target(head, target):
    model = build_model(tiny_swin(head, **target))  # encoder stride 16: a 2x2 feature map
    assert isinstance(model.decoder, HEADS[head])
    channels = 24 if target.get('NAME') == 'color_bins' else 3
    size = 32 // target.get('DOWNSAMPLE', 1)
    out = model.reconstruct(torch.randn(2, 3, 32, 32), torch.zeros(2, 8, 8, dtype=torch.long))
    assert out.shape == (2, channels, size, size)


def test_build_decoder_logs_the_head_parameter_count():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger('simmim.models')
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        model = build_model(tiny_swin('mlp'))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    message = ' '.join(r.getMessage() for r in records)
    assert f"'mlp': {count_parameters(model.decoder):,} parameters" in message


@pytest.mark.parametrize('model_type', ['swin', 'vit'])
@pytest.mark.parametrize('head', ['linear', 'mlp'])
def test_every_gradient_has_its_parameters_strides_so_ddp_copies_none(model_type, head):
    # DDP's gradient buckets follow each parameter's strides; a gradient laid out otherwise is
    # copied into its bucket every step (and DDP warns "Grad strides do not match bucket view
    # strides"). The heads' 1x1 convs see the encoder's channels-last feature map.
    config = tiny_config(model_type)
    config.MODEL.SIMMIM.HEAD.NAME = head
    model = build_model(config)
    grid = config.DATA.IMG_SIZE // model.patch_size
    images, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, grid, grid) < 0.6).long()
    model(images, mask).backward()
    different = [
        (name, p.stride(), p.grad.stride())
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.stride() != p.stride()
    ]
    assert different == []
