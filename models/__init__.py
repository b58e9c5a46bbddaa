"""Models: Swin V1/V2 and the BEiT-style ViT, their SimMIM encoders, and the SimMIM wrapper."""
from .build import ARCHITECTURES, build_classifier, build_encoder, build_model, build_simmim
from .simmim import SimMIM

__all__ = ['ARCHITECTURES', 'SimMIM', 'build_classifier', 'build_encoder', 'build_model',
           'build_simmim']
