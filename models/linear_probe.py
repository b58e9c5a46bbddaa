"""Linear probing: a frozen encoder, pooled features, BatchNorm without affine, one linear layer.

The head follows MAE's protocol (BatchNorm1d(affine=False, eps=1e-6) normalises the features, then a
Linear layer initialised with std 0.01). Features: for ViT, the patch tokens of block
LINEAR_PROBE.BLOCK (1-based; the SimMIM authors used block 8 of ViT-B, SimMIM issue #14),
average-pooled without the cls token; with BLOCK 0, and for Swin, the model's own pooled features
(last stage, final norm, average pool).
"""

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from yacs.config import CfgNode

from .build import build_classifier


class LinearProbe(nn.Module):
    """images (B, 3, H, W) -> logits (B, num_classes); only `head` is trained."""

    def __init__(self, encoder, num_classes, block=0):
        super().__init__()
        if block and not hasattr(encoder, 'forward_block_outputs'):
            raise ValueError(
                f'LINEAR_PROBE.BLOCK {block} needs a ViT encoder; use 0 for Swin (its '
                f'last stage is always used).'
            )
        if block and not 1 <= block <= len(encoder.blocks):
            raise ValueError(
                f'LINEAR_PROBE.BLOCK must lie in [1, {len(encoder.blocks)}] (or 0 for '
                f'the last block), got {block}.'
            )
        self.encoder = encoder.requires_grad_(False)
        self.block = block
        self.num_features = encoder.num_features
        self.head = nn.Sequential(
            nn.BatchNorm1d(self.num_features, affine=False, eps=1e-6),
            nn.Linear(self.num_features, num_classes),
        )
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    @torch.no_grad()
    def features(self, x):
        """(B, 3, H, W) -> (B, num_features), the frozen encoder's pooled features."""
        if self.block:
            tokens = self.encoder.forward_block_outputs(x)[self.block - 1]
            return tokens[:, 1:].mean(dim=1)
        return self.encoder.forward_features(x)

    def forward(self, x):
        return self.head(self.features(x))

    def train(self, mode=True):
        # The encoder stays in eval mode: no drop path, and its statistics are frozen.
        super().train(mode)
        self.encoder.eval()
        return self


def build_linear_probe(config: CfgNode) -> nn.Module:
    """The probe for config.MODEL.TYPE: a headless classifier backbone (load pre-trained weights
    into `probe.encoder`) and a new head with MODEL.NUM_CLASSES outputs."""
    backbone_config = config.clone()
    backbone_config.defrost()
    backbone_config.MODEL.NUM_CLASSES = 0
    backbone_config.MODEL.DROP_PATH_RATE = 0.0
    return LinearProbe(
        build_classifier(backbone_config), config.MODEL.NUM_CLASSES, config.LINEAR_PROBE.BLOCK
    )
