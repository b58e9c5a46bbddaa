"""Models: Swin V1/V2 and the BEiT-style ViT, their SimMIM encoders, and the SimMIM wrapper.

Importing the package registers the architectures (models/architectures.py) and the dvae_tokens
target (models/dvae_target.py)."""

from . import (
    architectures,  # noqa: F401  (registers swin, swinv2, vit)
    dvae_target,  # noqa: F401  (registers the dvae_tokens target)
)
from .build import build_classifier, build_encoder, build_model, build_simmim
from .registry import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    encoder_stride,
    get_architecture,
    model_patch_size,
    register_architecture,
    transformer_blocks,
)
from .simmim import SimMIM

__all__ = [
    'ARCHITECTURES',
    'Architecture',
    'SimMIM',
    'architecture_of',
    'build_classifier',
    'build_encoder',
    'build_model',
    'build_simmim',
    'encoder_stride',
    'get_architecture',
    'model_patch_size',
    'register_architecture',
    'transformer_blocks',
]
