"""The BEiT-style Vision Transformer used by SimMIM: timm's `Beit`, which has the official
state-dict names and computes the same outputs, with the official SimMIM initialisation and
dropout placement and the entry points the SimMIM encoder and linear probing need.

q/v biases (no k bias), layer scale (gamma_1, gamma_2), a relative position bias shared by all
blocks (pre-training) or one per block (fine-tuning) with 3 extra entries for the cls token,
optional absolute position embedding, and cls-token or mean pooling (with fc_norm).
Shapes use B = batch, L = patches, N = 1 + L tokens, C = embed_dim.
"""

from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch.utils.checkpoint import checkpoint

from utils.errors import require

from .attention import ignore_saved_copy

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)  # the official ViT's norm layer


def mlp_ratio_of(hidden_features, embed_dim):
    """MODEL.VIT.MLP_RATIO for an MLP of `hidden_features` on `embed_dim` channels: an int when
    whole (the key's default is the int 4), as another library's model is read into our config."""
    ratio = hidden_features / embed_dim
    return int(ratio) if float(ratio).is_integer() else ratio


def check_init_values(init_values):
    """MODEL.VIT.INIT_VALUES: None (no layer scale) or positive. timm's Beit reads 0 as "no layer
    scale" (no gamma parameters); the official code would build gammas fixed at 0, which silence
    every block."""
    require(
        init_values is None or init_values > 0,
        f'MODEL.VIT.INIT_VALUES {init_values}: use a positive layer scale (0.1 in the official '
        f'configs) or None to turn layer scale off.',
    )


class VisionTransformer(Beit):
    """BEiT-style ViT classifier: (B, in_chans, H, W) -> (B, num_classes).

    `forward_tokens` runs the blocks on patch tokens (so the SimMIM encoder can blend in its mask
    token first); `forward_block_outputs` gives every block's tokens for linear probing;
    `forward_features` gives pooled features (B, C), like our Swin's (timm's Beit gives tokens).
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=False,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer=LAYER_NORM,
        init_values=None,
        use_abs_pos_emb=True,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=False,
        use_mean_pooling=True,
        init_scale=0.001,
        use_checkpoint=False,
    ):
        check_init_values(init_values)
        # The official dropout: drop_rate after the position embedding and on the outputs of
        # attention and MLP; none before the head.
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool='avg' if use_mean_pooling else 'token',
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            drop_rate=0.0,
            pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            init_values=init_values,
            use_abs_pos_emb=use_abs_pos_emb,
            use_rel_pos_bias=use_rel_pos_bias,
            use_shared_rel_pos_bias=use_shared_rel_pos_bias,
            head_init_scale=init_scale,
        )
        self.img_size, self.patch_size = img_size, patch_size
        self.encoder_stride = patch_size
        self.patch_shape = self.patch_embed.grid_size
        self.set_grad_checkpointing(use_checkpoint)
        for block in self.blocks:
            block.mlp.drop1 = nn.Identity()  # BEiT's MLP has no dropout between fc1 and fc2
        for module in self.modules():
            if getattr(module, 'relative_position_index', None) is not None:
                ignore_saved_copy(module, 'relative_position_index')  # official files carry it

    # -------------------------------------------------------------------------------------------
    # Initialisation (official SimMIM ViT; timm's Beit leaves the patch-embedding conv at
    # PyTorch's default and truncates at +-2 absolute)
    # -------------------------------------------------------------------------------------------
    def _trunc_normal_(self, tensor, std):
        trunc_normal_(tensor, std=std)

    def init_weights(self, needs_reset=True):
        """Truncated-normal (std .02) weights, zero biases and position-bias tables, unit norms,
        BEiT's 1/sqrt(2 * layer) on each block's output projections, and a head scaled by
        `init_scale` (a near-zero head keeps the first fine-tuning steps gentle)."""
        self.apply(partial(self._init_weights, needs_reset=needs_reset))
        if self.pos_embed is not None:
            self._trunc_normal_(self.pos_embed, std=0.02)
        self._trunc_normal_(self.cls_token, std=0.02)
        self.fix_init_weight()
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    def _init_weights(self, m, needs_reset=True):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            self._trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif needs_reset and hasattr(m, 'reset_parameters'):
            m.reset_parameters()  # q/v biases and tables to zero, gammas to init_values

    # -------------------------------------------------------------------------------------------
    # Official interface
    # -------------------------------------------------------------------------------------------
    def get_num_layers(self):
        return len(self.blocks)

    def no_weight_decay(self):
        # The official ViT's set; timm's Beit would add the position-bias tables as well.
        return {'pos_embed', 'cls_token'}

    def no_weight_decay_keywords(self):
        # Position tables, shared or per block, as for Swin (the official ViT decayed them;
        # TRAIN.WEIGHT_DECAY_RULES official restores that).
        return {'relative_position_bias_table'}

    # -------------------------------------------------------------------------------------------
    # Forward
    # -------------------------------------------------------------------------------------------
    def forward_tokens(self, patch_tokens):
        """Patch tokens (B, L, C) -> all tokens after the blocks and `norm` (B, N, C), cls first."""
        x = torch.cat([self.cls_token.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, shared_bias, use_reentrant=False)
            else:
                x = block(x, shared_bias)
        return self.norm(x)

    def forward_block_outputs(self, x):
        """(B, in_chans, H, W) -> list with each block's output tokens (B, N, C), cls first,
        before any final norm (for linear probing an intermediate block)."""
        outputs = self.forward_intermediates(
            x, output_fmt='NLC', return_prefix_tokens=True, intermediates_only=True
        )
        return [torch.cat([cls, patches], dim=1) for patches, cls in outputs]

    def pool(self, tokens):
        """(B, N, C) -> (B, C): fc_norm of the mean patch token, or the cls token."""
        return self.forward_head(tokens, pre_logits=True)

    def forward_features(self, x):
        """(B, in_chans, H, W) -> pooled features (B, C)."""
        return self.pool(self.forward_tokens(self.patch_embed(x)))

    def forward(self, x):
        return self.head(self.forward_features(x))
