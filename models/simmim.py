"""SimMIM (Xie et al., CVPR 2022): encoders with a mask token and the wrapper that ties encoder,
prediction head and target/loss together.

    loss = SimMIM(encoder, decoder, criterion)(x, mask)

x: images (B, in_chans, H, W); mask: (B, H/p, W/p) at the model patch size p, 1 = masked.
The heads (`build_decoder`, models/heads.py) and the targets/losses (`build_criterion`,
models/targets.py) are separate units picked from the config.
"""

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2
from .vision_transformer import VisionTransformer


# -----------------------------------------------------------------------------------------------
# Encoders
# -----------------------------------------------------------------------------------------------
def blend_mask_token(tokens, mask, mask_token):
    """Replace the embeddings of masked patches by the learned mask token (Sec. 3.1).

    tokens: (B, L, C); mask: (B, h, w) with h*w = L, 1 = masked; mask_token: (1, 1, C).
    Returns (B, L, C).
    """
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_token)
    return tokens * (1.0 - w) + mask_token * w


def tokens_to_feature_map(tokens, height, width):
    """(B, height*width, C) -> (B, C, height, width)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


class _SwinEncoderForSimMIM:
    """Mixin for SwinTransformer / SwinTransformerV2: the mask token replaces masked patch
    embeddings after the patch-embedding LayerNorm. forward(x, mask) -> (B, C, H/s, W/s)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        assert self.num_classes == 0, 'the SimMIM encoder has no classifier head (num_classes=0)'
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def forward(self, x, mask):
        tokens = self.forward_tokens(blend_mask_token(self.patch_embed(x), mask, self.mask_token))
        s = self.encoder_stride
        return tokens_to_feature_map(tokens, x.shape[-2] // s, x.shape[-1] // s)

    def no_weight_decay(self):
        return super().no_weight_decay() | {'mask_token'}


class SwinTransformerForSimMIM(_SwinEncoderForSimMIM, SwinTransformer):
    """Swin V1 SimMIM encoder: (B, in_chans, H, W), (B, H/p, W/p) -> (B, num_features, H/s, W/s)."""


class SwinTransformerV2ForSimMIM(_SwinEncoderForSimMIM, SwinTransformerV2):
    """SwinV2 SimMIM encoder: (B, in_chans, H, W), (B, H/p, W/p) -> (B, num_features, H/s, W/s)."""


class VisionTransformerForSimMIM(VisionTransformer):
    """ViT SimMIM encoder: (B, in_chans, H, W), (B, H/p, W/p) -> (B, embed_dim, H/p, W/p).

    The cls token is dropped from the output. Every weight of this pre-training model is drawn
    from a normal truncated at +-1 std (BEiT pre-training init; the fine-tuning ViT is not).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        assert self.num_classes == 0, 'the SimMIM encoder has no classifier head (num_classes=0)'
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self._trunc_normal_(self.mask_token, std=0.02)

    def _trunc_normal_(self, tensor, std):
        trunc_normal_(tensor, std=std, a=-std, b=std)

    def forward(self, x, mask):
        tokens = self.forward_tokens(blend_mask_token(self.patch_embed(x), mask, self.mask_token))
        s = self.encoder_stride
        return tokens_to_feature_map(tokens[:, 1:], x.shape[-2] // s, x.shape[-1] // s)

    def no_weight_decay(self):
        # The official ViT encoder decays it (SimMIM issue #26); Swin never did.
        return super().no_weight_decay() | {'mask_token'}


# -----------------------------------------------------------------------------------------------
# Wrapper
# -----------------------------------------------------------------------------------------------
class SimMIM(nn.Module):
    """forward(x, mask) -> scalar loss; reconstruct(x, mask) -> the head's raw output (B, k, H/d,
    W/d); predict_image(x, mask) -> that prediction as a normalised image (B, in_chans, H, W)."""

    def __init__(self, encoder, decoder, criterion):
        super().__init__()
        self.encoder, self.decoder, self.criterion = encoder, decoder, criterion
        self.encoder_stride = encoder.encoder_stride
        self.in_chans, self.patch_size = encoder.in_chans, encoder.patch_size

    def reconstruct(self, x, mask):
        return self.decoder(self.encoder(x, mask))

    def forward(self, x, mask):
        return self.criterion(x, self.reconstruct(x, mask), mask)

    def predict_image(self, x, mask):
        return self.criterion.prediction_to_image(self.reconstruct(x, mask), x)

    def no_weight_decay(self):
        return {'encoder.' + name for name in self.encoder.no_weight_decay()}

    def no_weight_decay_keywords(self):
        # Unprefixed: they are substring matches, and 'encoder.relative_position_bias_table' would
        # match nothing (the official bug, Swin-Transformer issue #369).
        return set(self.encoder.no_weight_decay_keywords())
