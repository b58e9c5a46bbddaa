"""SimMIM (Xie et al., CVPR 2022): encoders with a mask token, the prediction head, the target and
loss, and the wrapper that ties them together.

    loss = SimMIM(encoder, decoder, criterion)(x, mask)

x: images (B, in_chans, H, W); mask: (B, H/p, W/p) at the model patch size p, 1 = masked.
The decoder (`build_decoder`) and the target/loss (`build_criterion`) are separate units so that
other heads and targets can be added as new factories without touching the encoders.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
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
    return tokens * (1. - w) + mask_token * w


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
        trunc_normal_(self.mask_token, mean=0., std=.02)

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
        self._trunc_normal_(self.mask_token, std=.02)

    def _trunc_normal_(self, tensor, std):
        trunc_normal_(tensor, std=std, a=-std, b=std)

    def forward(self, x, mask):
        tokens = self.forward_tokens(blend_mask_token(self.patch_embed(x), mask, self.mask_token))
        s = self.encoder_stride
        return tokens_to_feature_map(tokens[:, 1:], x.shape[-2] // s, x.shape[-1] // s)

    def no_weight_decay(self):
        # The official ViT encoder decays these (SimMIM issue #26); Swin never did.
        return super().no_weight_decay() | {'mask_token'}

    def no_weight_decay_keywords(self):
        return super().no_weight_decay_keywords() | {'relative_position_bias_table'}


# -----------------------------------------------------------------------------------------------
# Prediction head and target/loss
# -----------------------------------------------------------------------------------------------
def build_decoder(config, encoder):
    """The paper's linear head (Sec. 3.3): a 1x1 conv to stride**2 * in_chans values per feature-map
    position, rearranged to full resolution by PixelShuffle.
    (B, C, H/s, W/s) -> (B, in_chans, H, W). Official code writes 3 for in_chans (same for RGB)."""
    stride = encoder.encoder_stride
    return nn.Sequential(
        nn.Conv2d(encoder.num_features, stride ** 2 * encoder.in_chans, kernel_size=1),
        nn.PixelShuffle(stride))


def local_norm_target(x, window):
    """Normalise each pixel and channel by the mean and unbiased std of its `window` x `window`
    neighbourhood (zero padding excluded), as the Swin-repo SwinV2 config does (reference 3.4).
    (B, C, H, W) -> (B, C, H, W); `window` must be odd."""
    assert window % 2 == 1, f'the target normalisation window must be odd, got {window}'
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_of_squares = F.avg_pool2d(x ** 2, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(x), count_include_pad=True, **pool) * window ** 2
    var = ((mean_of_squares - mean ** 2) * (count / (count - 1))).clamp(min=0.)
    return (x - mean) / (var + 1e-6) ** 0.5


class MaskedPixelL1Loss(nn.Module):
    """l1 between prediction and target over the masked pixels only (Table 4), averaged over masked
    pixel-channels of the whole batch.

    forward(x (B, C, H, W), x_rec (B, C, H, W), mask (B, H/p, W/p)) -> scalar.
    norm_target_window: None for raw pixels, or the odd window of `local_norm_target`.
    """

    def __init__(self, patch_size, in_chans, norm_target_window=None):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.norm_target_window = norm_target_window

    def target(self, x):
        if self.norm_target_window is None:
            return x
        return local_norm_target(x, self.norm_target_window)

    def forward(self, x, x_rec, mask):
        p = self.patch_size
        # fp32 even under autocast: a bf16 sum of ~1e6 masked pixels would be off by ~0.4%.
        mask_pixels = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()
        error = (self.target(x.float()) - x_rec.float()).abs()
        return (error * mask_pixels).sum() / (mask_pixels.sum() + 1e-5) / self.in_chans


def build_criterion(config, encoder):
    norm = config.MODEL.SIMMIM.NORM_TARGET
    return MaskedPixelL1Loss(encoder.patch_size, encoder.in_chans,
                             norm_target_window=norm.PATCH_SIZE if norm.ENABLE else None)


# -----------------------------------------------------------------------------------------------
# Wrapper
# -----------------------------------------------------------------------------------------------
class SimMIM(nn.Module):
    """forward(x, mask) -> scalar loss; reconstruct(x, mask) -> x_rec (B, in_chans, H, W)."""

    def __init__(self, encoder, decoder, criterion):
        super().__init__()
        self.encoder, self.decoder, self.criterion = encoder, decoder, criterion
        self.encoder_stride = encoder.encoder_stride
        self.in_chans, self.patch_size = encoder.in_chans, encoder.patch_size

    def reconstruct(self, x, mask):
        return self.decoder(self.encoder(x, mask))

    def forward(self, x, mask):
        return self.criterion(x, self.reconstruct(x, mask), mask)

    def no_weight_decay(self):
        return {'encoder.' + name for name in self.encoder.no_weight_decay()}

    def no_weight_decay_keywords(self):
        # Unprefixed: they are substring matches, and 'encoder.relative_position_bias_table' would
        # match nothing (the official bug, Swin-Transformer issue #369).
        return set(self.encoder.no_weight_decay_keywords())
