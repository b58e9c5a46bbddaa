"""The architecture registry: one entry per MODEL.TYPE holding everything the rest of the code needs
to know about an encoder family, so that config validation, model building, layer-wise LR decay and
checkpoint loading ask the registry instead of testing MODEL.TYPE.

The entries themselves are in models/architectures.py; adding an encoder is a model file plus one
`register_architecture(Architecture(...))` there (worked example in CONTRIBUTING.md).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from utils.registry import Registry


@dataclass(frozen=True)
class Architecture:
    """One encoder family. `section` below is its config node, config.MODEL[config_key]."""

    name: str  # the MODEL.TYPE value
    config_key: str  # its section under MODEL (e.g. 'SWIN' for MODEL.SWIN.*)
    classifier: type  # the fine-tuning model: forward(images) -> logits
    encoder: type  # the SimMIM encoder: forward(images, mask) -> feature map (B, C, H/s, W/s)
    constructor_kwargs: Callable  # section -> arguments of both classes beyond the shared ones
    encoder_stride: Callable  # section -> s, pixels per position of the encoder's feature map
    num_layers: Callable  # section -> L, the number of blocks layer-wise LR decay counts
    layer_id: Callable  # (parameter name, section) -> its layer id in 0 .. L + 1
    remap_checkpoint: Callable  # (state_dict, model_state, patch_grid, logger) -> state_dict
    check_config: Callable  # config -> None; raises ConfigError naming the key and the fix
    # What the official code left out of weight decay (TRAIN.WEIGHT_DECAY_RULES official):
    # (backbone names, backbone keywords, names its SimMIM encoder added).
    official_no_weight_decay: tuple = ((), (), ())
    # The timm mapping (models.timm_mapping.TimmInterop) for tools/export.py, tools/import_timm.py
    # and MODEL.PRETRAINED timm:...; None: the type has no timm counterpart.
    timm: object = None

    def section(self, config):
        return config.MODEL[self.config_key]

    def patch_size(self, config):
        """Side, in pixels, of one patch of the encoder's patch embedding."""
        return self.section(config).PATCH_SIZE


ARCHITECTURES = Registry('MODEL.TYPE', 'types')  # in registration order


def register_architecture(architecture):
    """Make `architecture` available as MODEL.TYPE `architecture.name`; returns it."""
    return ARCHITECTURES.register(architecture.name, architecture)


def get_architecture(name):
    """The registered Architecture called `name`, or a ConfigError listing the valid types."""
    return ARCHITECTURES.lookup(name)


def architecture_of(config):
    """The Architecture of config.MODEL.TYPE."""
    return get_architecture(config.MODEL.TYPE)


def model_patch_size(config):
    """Side, in pixels, of one patch of the encoder's patch embedding."""
    return architecture_of(config).patch_size(config)


def encoder_stride(config):
    """Side, in pixels, of one position of the encoder's output feature map."""
    arch = architecture_of(config)
    return arch.encoder_stride(arch.section(config))


def transformer_blocks(model):
    """The transformer blocks of `model` in forward order: each member of a ModuleList named
    `blocks` (Swin and SwinV2 stages, the ViT, the inverse-Swin head). They are the units that
    TRAIN.COMPILE blocks compiles and TRAIN.SHARDING fsdp shards, one at a time."""
    return [
        block
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split('.')[-1] == 'blocks'
        for block in module
    ]
