"""The large-model configs build the models of the papers, counted on the meta device (no memory,
no initialisation cost).

The papers count the ImageNet-1K classifier (encoder + norm + 1000-class head): SimMIM Table 7
(Swin-L 197 M, SwinV2-H 658 M, SwinV2-G 3.0 B, as in the SwinV2 paper's Table 1) and, for ViT-L,
MAE's 304 M. The SimMIM pre-training model is the encoder with a mask token and the linear head
instead; its count is checked against the classifier's parts.
"""

import functools
import os

import pytest

from config import load_config
from engine import memory_plan
from tests.conftest import ROOT

LARGE_CONFIGS = {  # config -> the paper's parameter count of its 1000-class classifier
    'configs/swin_large__800ep/simmim_pretrain__swin_large__img192_window12__800ep.yaml': 197e6,
    'configs/swinv2_large__800ep/simmim_pretrain__swinv2_large__img192_window12__800ep.yaml': 197e6,
    'configs/swinv2_huge__800ep/simmim_pretrain__swinv2_huge__img192_window12__800ep.yaml': 658e6,
    'configs/swinv2_giant__800ep/simmim_pretrain__swinv2_giant__img192_window12__800ep.yaml': 3.0e9,
    'configs/vit_large__800ep/simmim_pretrain__vit_large__img224__800ep.yaml': 304e6,
}


def count(model):
    return sum(p.numel() for p in model.parameters())


@functools.cache
def build_on_meta(path, is_pretrain):
    opts = [] if is_pretrain else ['MODEL.NUM_CLASSES', 1000]
    config = load_config(os.path.join(ROOT, path), opts, is_pretrain=is_pretrain)
    return config, memory_plan.build_on_meta(config, is_pretrain)


@pytest.mark.parametrize('path', sorted(LARGE_CONFIGS))
def test_classifier_of_each_large_config_has_the_papers_parameter_count(path):
    _, classifier = build_on_meta(path, is_pretrain=False)
    assert count(classifier) == pytest.approx(LARGE_CONFIGS[path], rel=0.01)


@pytest.mark.parametrize('path', sorted(LARGE_CONFIGS))
def test_pretraining_model_is_the_classifier_body_plus_mask_token_and_linear_head(path):
    config, simmim = build_on_meta(path, is_pretrain=True)
    _, classifier = build_on_meta(path, is_pretrain=False)
    width, stride = classifier.num_features, simmim.encoder_stride
    head_1000 = width * 1000 + 1000
    linear_decoder = width * stride**2 * 3 + stride**2 * 3  # 1x1 conv to stride^2 * RGB
    mask_token = simmim.encoder.mask_token.numel()
    assert count(simmim) == count(classifier) - head_1000 + mask_token + linear_decoder
    assert config.TRAIN.USE_CHECKPOINT == (config.TRAIN.SHARDING == 'fsdp')


def test_huge_and_giant_are_sharded_with_checkpointing_and_the_papers_shapes():
    huge, _ = build_on_meta(
        'configs/swinv2_huge__800ep/simmim_pretrain__swinv2_huge__img192_window12__800ep.yaml', True
    )
    giant, _ = build_on_meta(
        'configs/swinv2_giant__800ep/simmim_pretrain__swinv2_giant__img192_window12__800ep.yaml',
        True,
    )
    for config in (huge, giant):
        assert (config.TRAIN.SHARDING, config.TRAIN.USE_CHECKPOINT) == ('fsdp', True)
        assert (config.DATA.IMG_SIZE, config.MODEL.SWINV2.WINDOW_SIZE) == (192, 12)
        heads, dim = config.MODEL.SWINV2.NUM_HEADS, config.MODEL.SWINV2.EMBED_DIM
        assert all(dim * 2**i // h == 32 for i, h in enumerate(heads))  # head width 32 (SwinV2)
    assert (huge.MODEL.SWINV2.EMBED_DIM, list(huge.MODEL.SWINV2.DEPTHS)) == (352, [2, 2, 18, 2])
    assert (giant.MODEL.SWINV2.EMBED_DIM, list(giant.MODEL.SWINV2.DEPTHS)) == (512, [2, 2, 42, 4])
