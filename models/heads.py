"""Prediction heads (section 3.3, Table 2): the encoder's feature map -> the prediction.

Every head maps (B, in_channels, h, w) -> (B, out_channels, h * upscale, w * upscale), where
out_channels is what the target predicts per pixel (3 for raw pixels) and upscale is
encoder_stride / TARGET.DOWNSAMPLE (32 for Swin at full resolution). A new head is a class with
that constructor signature (plus its own keyword options from `config_kwargs`, and `check_config`
for their checks) and an entry in `HEADS`; MODEL.SIMMIM.HEAD.NAME picks it, and the config
validation asks `check_head_config`.
"""

import logging

import torch.nn as nn
from timm.layers import Mlp
from yacs.config import CfgNode

from utils.errors import require
from utils.registry import Registry

from .swin_transformer import SwinTransformer, SwinTransformerBlock
from .targets import prediction_channels

logger = logging.getLogger('simmim.models')


def count_parameters(module):
    """Number of trainable parameters of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ConfigurableHead:
    """What every head offers the builder: its options from the config, and their checks."""

    @classmethod
    def config_kwargs(cls, config, input_resolution):
        """Constructor arguments beyond (in_channels, out_channels, upscale)."""
        return {}

    @classmethod
    def check_config(cls, config, upscale, input_resolution):
        """Raise ConfigError if the config's options for this head cannot work."""


def lay_out_like_their_gradients(module):
    """Give every 1x1 conv weight of `module` the strides its gradient has, (C, 1, C, C) instead of
    (C, 1, 1, 1): the encoder's feature map is a view of its tokens (channels last), so that is how
    the backward pass lays out these gradients, and DDP, whose gradient buckets follow the
    parameters' strides, would otherwise copy them every step (and warn "Grad strides do not
    match bucket view strides"). The values and the state-dict names are unchanged."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1):
            weight = conv.weight.detach()
            channels = weight.shape[1]
            conv.weight = nn.Parameter(
                weight.new_empty_strided(weight.shape, (channels, 1, channels, channels)).copy_(
                    weight
                )
            )
    return module


class LinearHead(ConfigurableHead, nn.Sequential):
    """The paper's head (section 3.3): a 1x1 conv to upscale**2 * out_channels values per position,
    rearranged by PixelShuffle. Parameters: (in_channels + 1) * upscale**2 * out_channels.
    State-dict names (0.weight, 0.bias) are the official decoder's."""

    def __init__(self, in_channels, out_channels, upscale):
        super().__init__(
            nn.Conv2d(in_channels, upscale**2 * out_channels, kernel_size=1),
            nn.PixelShuffle(upscale),
        )
        lay_out_like_their_gradients(self)


class MLPHead(ConfigurableHead, nn.Sequential):
    """2-layer MLP (1x1 convs with GELU) then PixelShuffle (Table 2). Parameters:
    (in_channels + 1) * hidden + (hidden + 1) * upscale**2 * out_channels."""

    def __init__(self, in_channels, out_channels, upscale, hidden_dim=None):
        super().__init__(
            Mlp(in_channels, hidden_dim or in_channels, upscale**2 * out_channels, use_conv=True),
            nn.PixelShuffle(upscale),
        )
        lay_out_like_their_gradients(self)

    @classmethod
    def config_kwargs(cls, config, input_resolution):
        return {'hidden_dim': config.MODEL.SIMMIM.HEAD.MLP_HIDDEN_DIM or None}


class PatchExpand(nn.Module):
    """Inverse of patch merging (as in Swin-Unet): a linear layer to scale**2 * out_dim channels
    spread over a scale x scale neighbourhood, then LayerNorm.
    (B, H*W, dim) -> (B, scale*H * scale*W, out_dim)."""

    def __init__(self, input_resolution, dim, out_dim, scale=2, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution, self.scale, self.out_dim = input_resolution, scale, out_dim
        self.expand = nn.Linear(dim, scale**2 * out_dim, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x):
        h, w = self.input_resolution
        b, s, c = x.shape[0], self.scale, self.out_dim
        x = self.expand(x).view(b, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, h * s * w * s, c))


class InverseSwinStage(nn.Module):
    """Swin blocks at one resolution, then (except in the last stage) patch expanding.
    (B, L, C) -> (B, 4L, C/2), or (B, L, C) without expanding."""

    def __init__(self, blocks, expand=None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.expand = expand if expand is not None else nn.Identity()

    def forward(self, x):
        return self.expand(self.blocks(x))


class InverseSwinHead(ConfigurableHead, nn.Module):
    """Inverse Swin decoder (Table 2): the encoder's features projected to the first stage's width,
    Swin stages from coarse to fine with patch expanding between them (2x resolution, half the
    width), a final norm, a final patch expanding by the remaining factor, and a linear layer to
    out_channels (the Swin-Unet decoder without skip connections).

    With the Table 2 presets at 192 px: inverse Swin-T (EMBED_DIM 96, DEPTHS 2-6-2-2, NUM_HEADS
    24-12-6-3) and inverse Swin-B (128, 2-18-2-2, 32-16-8-4) run at 6, 12, 24, 48 px and expand x4
    to 192. `input_resolution` is the encoder feature map's (h, w); `upscale` must be a multiple of
    2**(stages - 1).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        upscale,
        input_resolution,
        embed_dim=96,
        depths=(2, 6, 2, 2),
        num_heads=(24, 12, 6, 3),
        window_size=6,
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.check_stages(upscale, input_resolution, embed_dim, depths, num_heads, window_size)
        num_stages = len(depths)
        final_scale = upscale // 2 ** (num_stages - 1)
        self.upscale = upscale
        dims = [embed_dim * 2 ** (num_stages - 1 - i) for i in range(num_stages)]
        self.proj = nn.Linear(in_channels, dims[0])
        self.stages = nn.ModuleList()
        h, w = input_resolution
        for i, (depth, heads, dim) in enumerate(zip(depths, num_heads, dims, strict=True)):
            blocks = [
                SwinTransformerBlock(
                    dim,
                    (h, w),
                    heads,
                    window_size=window_size,
                    shift_size=0 if j % 2 == 0 else window_size // 2,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    norm_layer=norm_layer,
                )
                for j in range(depth)
            ]
            last = i == num_stages - 1
            expand = None if last else PatchExpand((h, w), dim, dim // 2, 2, norm_layer)
            self.stages.append(InverseSwinStage(blocks, expand))
            if not last:
                h, w = 2 * h, 2 * w
        self.norm = norm_layer(dims[-1])
        self.final_expand = (
            PatchExpand((h, w), dims[-1], dims[-1], final_scale, norm_layer)
            if final_scale > 1
            else nn.Identity()
        )
        self.output = nn.Linear(dims[-1], out_channels)
        self.apply(SwinTransformer._init_weights)

    @classmethod
    def config_kwargs(cls, config, input_resolution):
        inv = config.MODEL.SIMMIM.HEAD.INVERSE_SWIN
        return dict(
            input_resolution=input_resolution,
            embed_dim=inv.EMBED_DIM,
            depths=inv.DEPTHS,
            num_heads=inv.NUM_HEADS,
            window_size=inv.WINDOW_SIZE,
            mlp_ratio=inv.MLP_RATIO,
        )

    @classmethod
    def check_config(cls, config, upscale, input_resolution):
        inv = config.MODEL.SIMMIM.HEAD.INVERSE_SWIN
        cls.check_stages(
            upscale, input_resolution, inv.EMBED_DIM, inv.DEPTHS, inv.NUM_HEADS, inv.WINDOW_SIZE
        )

    @staticmethod
    def check_stages(upscale, input_resolution, embed_dim, depths, num_heads, window_size):
        """Raise ConfigError (naming the MODEL.SIMMIM.HEAD.INVERSE_SWIN keys) unless the stages fit
        the upscale factor and every stage's width and map suit its heads and window."""
        key = 'MODEL.SIMMIM.HEAD.INVERSE_SWIN'
        num_stages = len(depths)
        require(
            num_stages >= 1 and len(num_heads) == num_stages,
            f'{key}.DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} must have the same '
            f'length (one entry per stage).',
        )
        require(
            upscale % 2 ** (num_stages - 1) == 0,
            f'The inverse_swin head doubles the resolution {num_stages - 1} times, so its '
            f'upscale must be a multiple of {2 ** (num_stages - 1)}, but the prediction is '
            f"only {upscale}x finer than the encoder's feature map (encoder stride / "
            f'MODEL.SIMMIM.TARGET.DOWNSAMPLE). Lower TARGET.DOWNSAMPLE, use fewer stages in '
            f'{key}.DEPTHS, or use the linear head.',
        )
        for i, heads in enumerate(num_heads):
            dim = embed_dim * 2 ** (num_stages - 1 - i)
            require(
                dim % heads == 0,
                f'{key} stage {i} width {dim} is not divisible by NUM_HEADS[{i}] = {heads}.',
            )
            for side in input_resolution:
                resolution = side * 2**i
                require(
                    resolution % min(window_size, resolution) == 0,
                    f"{key}.WINDOW_SIZE {window_size} does not tile stage {i}'s {resolution}x"
                    f"{resolution} map; pick a window that divides every stage's map.",
                )

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))  # (B, h*w, dims[0])
        for stage in self.stages:
            x = stage(x)
        x = self.output(self.final_expand(self.norm(x)))  # (B, H*W, out_channels)
        return x.transpose(1, 2).reshape(b, -1, h * self.upscale, w * self.upscale)


HEADS = Registry(
    'MODEL.SIMMIM.HEAD.NAME',
    'heads',
    {'linear': LinearHead, 'mlp': MLPHead, 'inverse_swin': InverseSwinHead},
)


def _head_class(config):
    return HEADS.lookup(config.MODEL.SIMMIM.HEAD.NAME)


def check_head_config(config, encoder_stride):
    """Raise ConfigError for a bad MODEL.SIMMIM.HEAD section, for an encoder of `encoder_stride`."""
    feature_map = config.DATA.IMG_SIZE // encoder_stride
    upscale = encoder_stride // config.MODEL.SIMMIM.TARGET.DOWNSAMPLE
    _head_class(config).check_config(config, upscale, (feature_map, feature_map))


def build_decoder(config: CfgNode, encoder: nn.Module) -> nn.Module:
    """The prediction head MODEL.SIMMIM.HEAD.NAME for `encoder`, sized for MODEL.SIMMIM.TARGET:
    (B, num_features, H/s, W/s) -> (B, prediction channels, H/d, W/d) for encoder stride s and
    TARGET.DOWNSAMPLE d. Logs its parameter count (Table 2's #params)."""
    name = config.MODEL.SIMMIM.HEAD.NAME
    head_class = _head_class(config)
    stride = encoder.encoder_stride
    feature_map = config.DATA.IMG_SIZE // stride
    head = head_class(
        encoder.num_features,
        prediction_channels(config, encoder.in_chans),
        stride // config.MODEL.SIMMIM.TARGET.DOWNSAMPLE,
        **head_class.config_kwargs(config, (feature_map, feature_map)),
    )
    logger.info(
        f"prediction head '{name}': {count_parameters(head):,} parameters "
        f'(encoder {count_parameters(encoder):,})'
    )
    return head
