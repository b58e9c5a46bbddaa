"""Swin Transformer V2 (Liu et al., CVPR 2022), with the official state-dict names.

What differs from V1 (swin_transformer.py, whose window helpers and model skeleton are reused):
scaled cosine attention with a learned per-head temperature, a continuous position bias from a
small MLP on log-spaced offsets, residual post-norm, and patch merging that normalises after the
projection.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import gen_relative_log_coords, to_2tuple

from .attention import (
    add_qv_bias,
    gather_position_bias,
    qkv_with_qv_bias,
    register_derived_buffer,
    relative_position_index,
)
from .swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from .window_attention import attend_windows


def log_spaced_coords_table(window_size, pretrained_window_size=(0, 0)):
    """Relative offsets of a window, (1, 2Wh-1, 2Ww-1, 2), scaled to [-8, 8] by the pre-training
    window (or this window when it is 0) and log-spaced: sign(d) * log2(1 + |d|) / log2(8)
    (SwinV2 Sec. 3.3), so a larger fine-tuning window extrapolates smoothly. timm's helper (the
    official formula), with the official leading axis."""
    return gen_relative_log_coords(tuple(window_size), tuple(pretrained_window_size)).unsqueeze(0)


class WindowAttentionV2(nn.Module):
    """Scaled cosine window attention with a continuous position bias 16 * sigmoid(cpb_mlp(.)).

    (B * num_windows, N, C) -> (B * num_windows, N, C); mask: (num_windows, N, N) or None.
    """

    max_logit_scale = math.log(100.0)  # the learned temperature is clamped at 100
    window_kernel = 'sdpa'  # MODEL.WINDOW_ATTENTION (models/window_attention.py)

    def __init__(
        self,
        dim,
        window_size,
        num_heads,
        qkv_bias=True,
        attn_drop=0.0,
        proj_drop=0.0,
        pretrained_window_size=(0, 0),
    ):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.pretrained_window_size = pretrained_window_size
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_heads, bias=False),
        )
        register_derived_buffer(
            self,
            'relative_coords_table',
            log_spaced_coords_table(window_size, pretrained_window_size),
        )
        register_derived_buffer(
            self, 'relative_position_index', relative_position_index(window_size)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        add_qv_bias(self, dim, qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self):
        """(heads, N, N), in (0, 16)."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return 16 * torch.sigmoid(gather_position_bias(table, self.relative_position_index))

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = qkv_with_qv_bias(x, self.qkv, self.q_bias, self.v_bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # cos(q, k) * temperature: fold the temperature into q and use scale 1.
        temperature = torch.clamp(self.logit_scale, max=self.max_logit_scale).exp()
        q = F.normalize(q, dim=-1) * temperature
        k = F.normalize(k, dim=-1)
        x = attend_windows(
            q,
            k,
            v,
            self.position_bias(),
            mask,
            1.0,
            self.attn_drop if self.training else 0.0,
            self.window_kernel,
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class SwinTransformerBlockV2(SwinTransformerBlock):
    """Res-post-norm Swin block: x + drop_path(norm(attn(x))), then the same for the MLP.

    (B, L, C) -> (B, L, C).
    """

    attention_layer = WindowAttentionV2

    def forward(self, x):
        x = x + self.drop_path(self.norm1(self.window_attention(x)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMergingV2(PatchMerging):
    """(B, H*W, C) -> (B, H/2*W/2, 2C), LayerNorm over the projected 2C channels."""

    norm_after_reduction = True


class SwinTransformerV2(SwinTransformer):
    """Swin Transformer V2 classifier: (B, in_chans, H, W) -> (B, num_classes).

    pretrained_window_sizes: per stage, the window the position-bias MLP was pre-trained with
    (0 = this model's window), so fine-tuning at a larger window reuses the pre-trained MLP.
    """

    block_layer = SwinTransformerBlockV2
    downsample_layer = PatchMergingV2

    def __init__(self, pretrained_window_sizes=(0, 0, 0, 0), **kwargs):
        """The other arguments are SwinTransformer's (its qk_scale has no use here)."""
        stage_attn_kwargs = [
            {'pretrained_window_size': to_2tuple(size)} for size in pretrained_window_sizes
        ]
        super().__init__(stage_attn_kwargs=stage_attn_kwargs, **kwargs)
        # Post-norms start at zero so every residual branch starts switched off (official init).
        for layer in self.layers:
            for block in layer.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def no_weight_decay_keywords(self):
        return {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}
