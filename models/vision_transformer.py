"""The BEiT-style Vision Transformer used by SimMIM, with the official state-dict names.

q/v biases (no k bias), layer scale (gamma_1, gamma_2), a relative position bias shared by all
blocks (pre-training) or one per block (fine-tuning) with 3 extra entries for the cls token,
optional absolute position embedding, and cls-token or mean pooling (with fc_norm).
Shapes use B = batch, L = patches, N = 1 + L tokens, C = embed_dim.
"""
import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from .attention import (add_qv_bias, attention, gather_position_bias, qkv_with_qv_bias,
                        register_derived_buffer, relative_position_index)


def relative_position_index_with_cls(window_size):
    """(N, N) index into a ((2Wh-1)(2Ww-1) + 3)-row table: patch pairs by offset, then one row
    each for cls -> patch, patch -> cls and cls -> cls (BEiT)."""
    num_offsets = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
    n = window_size[0] * window_size[1] + 1
    index = torch.zeros(n, n, dtype=torch.long)
    index[1:, 1:] = relative_position_index(window_size)
    index[0, :] = num_offsets
    index[:, 0] = num_offsets + 1
    index[0, 0] = num_offsets + 2
    return index


def num_relative_positions(window_size):
    return (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3


class RelativePositionBias(nn.Module):
    """The relative position bias shared by all blocks: () -> (heads, N, N). Zero-initialised."""

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(num_relative_positions(window_size), num_heads))
        register_derived_buffer(self, 'relative_position_index',
                                relative_position_index_with_cls(window_size))

    def forward(self):
        return gather_position_bias(self.relative_position_bias_table, self.relative_position_index)


class Attention(nn.Module):
    """Multi-head self-attention with q/v biases and an optional per-block relative position bias.

    (B, N, C) -> (B, N, C); rel_pos_bias: the shared bias (heads, N, N) or None.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.,
                 proj_drop=0., window_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        add_qv_bias(self, dim, qkv_bias)
        if window_size:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_positions(window_size), num_heads))
            register_derived_buffer(self, 'relative_position_index',
                                    relative_position_index_with_cls(window_size))
        else:
            self.relative_position_bias_table = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rel_pos_bias=None):
        b, n, c = x.shape
        qkv = qkv_with_qv_bias(x, self.qkv, self.q_bias, self.v_bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias
        if self.relative_position_bias_table is not None:
            own = gather_position_bias(self.relative_position_bias_table,
                                       self.relative_position_index)
            bias = own if bias is None else own + bias
        if bias is not None:
            bias = bias.unsqueeze(0)
        x = attention(q, k, v, bias, self.scale, self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0.,
                 attn_drop=0., drop_path=0., init_values=None, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, window_size=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        # BEiT's MLP has no dropout between fc1 and fc2.
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=(0., drop))
        if init_values is not None:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    @staticmethod
    def _layer_scale(gamma, x):
        return x if gamma is None else gamma * x

    def forward(self, x, rel_pos_bias=None):
        scale = self._layer_scale
        x = x + self.drop_path(scale(self.gamma_1, self.attn(self.norm1(x), rel_pos_bias)))
        return x + self.drop_path(scale(self.gamma_2, self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """BEiT-style ViT classifier: (B, in_chans, H, W) -> (B, num_classes).

    `forward_tokens` runs the blocks on patch tokens (so the SimMIM encoder can blend in its mask
    token first); `forward_block_outputs` gives every block's tokens for linear probing.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=None,
                 use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False,
                 use_mean_pooling=True, init_scale=0.001, use_checkpoint=False):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.encoder_stride = patch_size
        self.use_checkpoint = use_checkpoint

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.patch_shape = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
                          if use_abs_pos_emb else None)
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.rel_pos_bias = (RelativePositionBias(self.patch_shape, num_heads)
                             if use_shared_rel_pos_bias else None)

        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([Block(
            embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop=drop_rate,
            attn_drop=attn_drop_rate, drop_path=drop_path_rates[i], init_values=init_values,
            norm_layer=norm_layer, window_size=self.patch_shape if use_rel_pos_bias else None)
            for i in range(depth)])
        self.norm = nn.Identity() if use_mean_pooling else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if self.pos_embed is not None:
            self._trunc_normal_(self.pos_embed, std=.02)
        self._trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)
        self.fix_init_weight()
        if num_classes > 0:
            with torch.no_grad():  # a near-zero head keeps the first fine-tuning steps gentle
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)

    def _trunc_normal_(self, tensor, std):
        trunc_normal_(tensor, std=std)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            self._trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def fix_init_weight(self):
        """Divide the residual-branch output weights of block i (1-based) by sqrt(2i) (BEiT)."""
        for i, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def get_num_layers(self):
        return len(self.blocks)

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def no_weight_decay_keywords(self):
        # Position tables, shared or per block, as for Swin (the official ViT decayed them;
        # TRAIN.WEIGHT_DECAY_RULES official restores that).
        return {'relative_position_bias_table'}

    def _run_blocks(self, patch_tokens, keep_outputs):
        """Patch tokens (B, L, C) -> (tokens after the last block (B, N, C), list of per-block
        outputs if `keep_outputs`)."""
        x = torch.cat([self.cls_token.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        outputs = []
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, shared_bias, use_reentrant=False)
            else:
                x = block(x, shared_bias)
            if keep_outputs:
                outputs.append(x)
        return x, outputs

    def forward_tokens(self, patch_tokens):
        """Patch tokens (B, L, C) -> all tokens after the blocks and `norm` (B, N, C), cls first."""
        return self.norm(self._run_blocks(patch_tokens, keep_outputs=False)[0])

    def forward_block_outputs(self, x):
        """(B, in_chans, H, W) -> list with each block's output tokens (B, N, C), cls first,
        before any final norm (for linear probing an intermediate block)."""
        return self._run_blocks(self.patch_embed(x), keep_outputs=True)[1]

    def pool(self, tokens):
        """(B, N, C) -> (B, C): fc_norm of the mean patch token, or the cls token."""
        if self.fc_norm is not None:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return tokens[:, 0]

    def forward_features(self, x):
        """(B, in_chans, H, W) -> pooled features (B, C)."""
        return self.pool(self.forward_tokens(self.patch_embed(x)))

    def forward(self, x):
        return self.head(self.forward_features(x))
