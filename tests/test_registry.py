"""models/registry.py and models/architectures.py: one registry entry per MODEL.TYPE carries
everything the rest of the code asks about an architecture, so a new one is a single
registration."""

import pytest
import torch

from checkpoint.weights import adapt_state_dict
from config import get_defaults, validate_config
from models import (
    ARCHITECTURES,
    Architecture,
    build_classifier,
    build_simmim,
    encoder_stride,
    get_architecture,
    model_patch_size,
    register_architecture,
)
from models.architectures import remap_vit, vit_kwargs, vit_layer_id
from models.simmim import VisionTransformerForSimMIM
from models.vision_transformer import VisionTransformer
from optimizer import layer_lr_scales
from utils.errors import ConfigError, require
from utils.tasks import PRETRAIN


def test_registered_types_have_a_defaults_section_and_their_geometry():
    config = get_defaults()
    assert list(ARCHITECTURES) == ['swin', 'swinv2', 'vit']
    expected = {'swin': (4, 32), 'swinv2': (4, 32), 'vit': (16, 16)}  # patch size, 4 stages / 1
    for name, arch in ARCHITECTURES.items():
        assert arch.name == name and arch.config_key in config.MODEL
        config.MODEL.TYPE = name
        assert (model_patch_size(config), encoder_stride(config)) == expected[name]


def test_an_unknown_type_names_the_registered_ones():
    with pytest.raises(ConfigError, match="MODEL.TYPE 'resnet' .*valid types: swin, swinv2, vit"):
        get_architecture('resnet')
    with pytest.raises(ValueError, match='registered twice'):
        register_architecture(ARCHITECTURES['vit'])


@pytest.fixture
def small_vit_type():
    """A new MODEL.TYPE 'small_vit' with its own config section MODEL.SMALL_VIT, registered the way
    CONTRIBUTING.md tells a newcomer to (and removed afterwards)."""
    checked = []

    def check(config):
        checked.append(config.MODEL.TYPE)
        require(config.MODEL.SMALL_VIT.DEPTH <= 4, 'MODEL.SMALL_VIT.DEPTH must be at most 4.')

    register_architecture(
        Architecture(
            name='small_vit',
            config_key='SMALL_VIT',
            classifier=VisionTransformer,
            encoder=VisionTransformerForSimMIM,
            constructor_kwargs=vit_kwargs,
            encoder_stride=lambda s: s.PATCH_SIZE,
            num_layers=lambda s: s.DEPTH,
            layer_id=lambda name, s: vit_layer_id(name, s.DEPTH),
            remap_checkpoint=remap_vit,
            check_config=check,
        )
    )
    config = get_defaults()
    config.MODEL.SMALL_VIT = config.MODEL.VIT.clone()
    config.MODEL.SMALL_VIT.update(PATCH_SIZE=8, EMBED_DIM=16, DEPTH=2, NUM_HEADS=2)
    config.MODEL.TYPE = 'small_vit'
    config.MODEL.NUM_CLASSES = 3
    config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE = 32, 16
    try:
        yield config, checked
    finally:
        del ARCHITECTURES['small_vit']


def test_a_new_architecture_works_everywhere_from_one_registration(small_vit_type):
    config, checked = small_vit_type
    validate_config(config, PRETRAIN)
    assert checked == ['small_vit']
    simmim = build_simmim(config)
    assert simmim.encoder.patch_size == 8 and simmim.encoder_stride == 8
    loss = simmim(torch.randn(2, 3, 32, 32), torch.ones(2, 4, 4, dtype=torch.long))
    assert loss.ndim == 0 and torch.isfinite(loss)
    config.MODEL.SMALL_VIT.update(USE_RPB=True, USE_SHARED_RPB=False)  # as fine-tuning configs do
    classifier = build_classifier(config)
    config.TRAIN.LAYER_DECAY = 0.5
    scales = layer_lr_scales(config, classifier)
    assert scales['patch_embed.proj.weight'] == 0.5**3 and scales['head.weight'] == 1.0
    sd = adapt_state_dict({'model': simmim.state_dict()}, classifier.state_dict(), 'small_vit')
    assert 'blocks.0.attn.relative_position_bias_table' in sd  # remap_vit: shared -> per block
    config.MODEL.SMALL_VIT.DEPTH = 5
    with pytest.raises(ConfigError, match='SMALL_VIT.DEPTH must be at most 4'):
        validate_config(config, PRETRAIN)


def test_the_timm_mapping_is_a_field_of_the_entry(small_vit_type):
    from checkpoint.timm_folder import interop_for

    with_timm = {name for name, arch in ARCHITECTURES.items() if arch.timm is not None}
    assert with_timm == {'swin', 'swinv2', 'vit'}
    assert all(interop_for(name) is ARCHITECTURES[name].timm for name in with_timm)
    with pytest.raises(
        ConfigError,
        match="'small_vit' has no timm mapping; known: swin, swinv2, vit .*`timm` field",
    ):
        interop_for('small_vit')  # registered without one
