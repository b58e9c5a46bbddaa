"""Swin Transformer V1 (Liu et al., ICCV 2021), with the official state-dict names.

Shapes use B = batch, L = H*W tokens of a stage, C = channels, N = Wh*Ww tokens of a window.
The window helpers and the stage/model skeleton are shared with SwinV2 (swin_transformer_v2.py).
"""

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from torch.utils.checkpoint import checkpoint

from .attention import gather_position_bias, register_derived_buffer, relative_position_index
from .window_attention import attend_windows


# -----------------------------------------------------------------------------------------------
# Window helpers
# -----------------------------------------------------------------------------------------------
def window_partition(x, window_size):
    """(B, H, W, C) -> (B * num_windows, window_size**2, C), windows row-major per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows, window_size, h, w):
    """(B * num_windows, window_size**2, C) -> (B, H, W, C); inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def clamp_window(input_resolution, window_size, shift_size):
    """A window at least as large as the feature map becomes the whole map, unshifted (official)."""
    if min(input_resolution) <= window_size:
        return min(input_resolution), 0
    return window_size, shift_size


def shifted_window_mask(input_resolution, window_size, shift_size):
    """Additive mask (num_windows, N, N) that keeps a shifted window from attending across the
    seams of the cyclic shift: 0 within a region, -100 between regions (official fill). None when
    there is no shift."""
    if shift_size == 0:
        return None
    h, w = input_resolution
    regions = torch.zeros(1, h, w, 1)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            regions[:, rows, cols, :] = i * len(bounds) + j
    regions = window_partition(regions, window_size).squeeze(-1)  # (num_windows, N)
    different = regions.unsqueeze(1) != regions.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, -100.0)


# -----------------------------------------------------------------------------------------------
# Blocks
# -----------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias table.

    (B * num_windows, N, C) -> (B * num_windows, N, C); mask: (num_windows, N, N) or None.
    """

    window_kernel = 'sdpa'  # MODEL.WINDOW_ATTENTION (models/window_attention.py)

    def __init__(
        self,
        dim,
        window_size,
        num_heads,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
    ):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        register_derived_buffer(
            self, 'relative_position_index', relative_position_index(window_size)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = gather_position_bias(self.relative_position_bias_table, self.relative_position_index)
        x = attend_windows(
            q,
            k,
            v,
            bias,
            mask,
            self.scale,
            self.attn_drop if self.training else 0.0,
            self.window_kernel,
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block: (shifted) window attention, then MLP, each residual with drop path.

    (B, L, C) -> (B, L, C) with L = H*W of `input_resolution`.
    """

    attention_layer = WindowAttention

    def __init__(
        self,
        dim,
        input_resolution,
        num_heads,
        window_size=7,
        shift_size=0,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        **attn_kwargs,
    ):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, input_resolution, num_heads
        self.window_size, self.shift_size = clamp_window(input_resolution, window_size, shift_size)
        self.norm1 = norm_layer(dim)
        self.attn = self.attention_layer(
            dim,
            to_2tuple(self.window_size),
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            **attn_kwargs,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        register_derived_buffer(
            self,
            'attn_mask',
            shifted_window_mask(input_resolution, self.window_size, self.shift_size),
        )

    def window_attention(self, x):
        """(B, L, C) -> (B, L, C): cyclic shift, attention per window, merge, shift back."""
        h, w = self.input_resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window_size), mask=self.attn_mask)
        x = window_reverse(windows, self.window_size, h, w)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x.reshape(b, h * w, c)

    def forward(self, x):
        x = x + self.drop_path(self.window_attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood and project 4C -> 2C: (B, H*W, C) -> (B, H/2*W/2, 2C).

    V1 normalises before the projection (norm over 4C); SwinV2 after it (norm over 2C).
    """

    norm_after_reduction = False

    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution, self.dim = input_resolution, dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim if self.norm_after_reduction else 4 * dim)

    def forward(self, x):
        h, w = self.input_resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        # Channel order (0,0), (1,0), (0,1), (1,1) as official, so checkpoints stay compatible.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = x.view(b, -1, 4 * c)
        if self.norm_after_reduction:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: blocks at one resolution, then optional patch merging.
    (B, L, C) -> (B, L', C')."""

    def __init__(self, blocks, downsample=None, use_checkpoint=False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if self.downsample is None else self.downsample(x)


# -----------------------------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------------------------
class SwinTransformer(nn.Module):
    """Swin Transformer classifier: (B, in_chans, H, W) -> (B, num_classes).

    `forward_tokens` runs the stages on patch tokens so the SimMIM encoder can blend in its mask
    token first; `encoder_stride` is the total down-sampling, patch_size * 2**(stages - 1).
    SwinV2 subclasses this and swaps `block_layer` / `downsample_layer`; `stage_attn_kwargs` (one
    dict per stage, default {'qk_scale': qk_scale}) are extra arguments of the attention layer.
    """

    block_layer = SwinTransformerBlock
    downsample_layer = PatchMerging

    def __init__(
        self,
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        norm_layer=nn.LayerNorm,
        ape=False,
        patch_norm=True,
        use_checkpoint=False,
        stage_attn_kwargs=None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim, self.mlp_ratio = embed_dim, mlp_ratio
        self.ape, self.patch_norm = ape, patch_norm
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.encoder_stride = patch_size * 2 ** (self.num_layers - 1)
        if stage_attn_kwargs is None:
            stage_attn_kwargs = [{'qk_scale': qk_scale}] * self.num_layers

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer if patch_norm else None
        )
        self.patches_resolution = grid = self.patch_embed.grid_size
        if ape:
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, self.patch_embed.num_patches, embed_dim)
            )
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Stochastic depth grows linearly over all blocks of all stages.
        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = int(embed_dim * 2**i)
            resolution = (grid[0] // 2**i, grid[1] // 2**i)
            first = sum(depths[:i])
            blocks = [
                self.block_layer(
                    dim,
                    resolution,
                    heads,
                    window_size=window_size,
                    shift_size=0 if j % 2 == 0 else window_size // 2,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rates[first + j],
                    norm_layer=norm_layer,
                    **stage_attn_kwargs[i],
                )
                for j in range(depth)
            ]
            downsample = (
                self.downsample_layer(resolution, dim, norm_layer)
                if i < self.num_layers - 1
                else None
            )
            self.layers.append(BasicLayer(blocks, downsample, use_checkpoint))
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table'}

    def forward_tokens(self, x):
        """Patch tokens (B, L, embed_dim) -> final-stage tokens after the last norm
        (B, L / 4**(stages-1), num_features)."""
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_features(self, x):
        """(B, in_chans, H, W) -> pooled features (B, num_features)."""
        return self.forward_tokens(self.patch_embed(x)).mean(dim=1)

    def forward(self, x):
        return self.head(self.forward_features(x))
