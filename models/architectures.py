"""The registered architectures (MODEL.TYPE swin, swinv2, vit): for each, what the rest of the code
needs besides its nn.Modules, in one place.

- constructor arguments from its config section (MODEL.SWIN / MODEL.SWINV2 / MODEL.VIT);
- encoder stride (the feature map the SimMIM head upsamples);
- layer ids for layer-wise LR decay (the official get_swin_layer / get_vit_layer, reference 5.2);
- the checkpoint remap load_pretrained runs (reference 6.3);
- the checks of its config section.

Adding an encoder: its classes in a model file, then one `register_architecture(...)` block here and
its defaults section in config.py (worked example in CONTRIBUTING.md).
"""

import re

from utils.errors import require
from utils.state_dict import (
    drop_rebuilt_buffers,
    log_info,
    rename_released_keys,
    resize_pos_embed_entry,
    resize_position_tables,
)

from . import timm_mapping
from .registry import Architecture, register_architecture
from .simmim import SwinTransformerForSimMIM, SwinTransformerV2ForSimMIM, VisionTransformerForSimMIM
from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2
from .vision_transformer import VisionTransformer, check_init_values

VIT_NUM_EXTRA_TOKENS = 3  # rows of cls->token, token->cls, cls->cls in a ViT RPB table
SHARED_VIT_TABLE = 'rel_pos_bias.relative_position_bias_table'


# -----------------------------------------------------------------------------------------------
# Swin V1 / V2
# -----------------------------------------------------------------------------------------------
def swin_family_kwargs(swin):
    """Arguments shared by Swin V1 and V2 from their MODEL.SWIN / MODEL.SWINV2 node."""
    return dict(
        patch_size=swin.PATCH_SIZE,
        in_chans=swin.IN_CHANS,
        embed_dim=swin.EMBED_DIM,
        depths=swin.DEPTHS,
        num_heads=swin.NUM_HEADS,
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS,
        ape=swin.APE,
        patch_norm=swin.PATCH_NORM,
    )


def swin_encoder_stride(swin):
    """The patch size times one 2x patch merge per stage after the first."""
    return swin.PATCH_SIZE * 2 ** (len(swin.DEPTHS) - 1)


def swin_layer_id(name, depths):
    """0 for the embedding, 1..L for blocks in order, L + 1 for everything after the last block
    (final norm, head) and, as in the official code, for absolute_pos_embed."""
    num_blocks = sum(depths)
    if name == 'mask_token' or name.startswith('patch_embed'):
        return 0
    match = re.match(r'layers\.(\d+)\.(blocks\.(\d+)|downsample)\.', name)
    if match:
        stage = int(match.group(1))
        if match.group(3) is not None:
            return sum(depths[:stage]) + int(match.group(3)) + 1
        return sum(depths[: stage + 1])  # patch merging shares the id of its stage's last block
    return num_blocks + 1


def check_swin_family(config, key):
    """Stages, widths and windows of MODEL.<key> against DATA.IMG_SIZE."""
    arch = config.MODEL[key]
    img, patch, depths = config.DATA.IMG_SIZE, arch.PATCH_SIZE, arch.DEPTHS
    require(
        len(depths) == len(arch.NUM_HEADS),
        f'MODEL.{key}.DEPTHS {list(depths)} and MODEL.{key}.NUM_HEADS {list(arch.NUM_HEADS)} '
        f'must have the same length (one entry per stage).',
    )
    down = swin_encoder_stride(arch)
    require(
        img % down == 0,
        f'DATA.IMG_SIZE {img} must be divisible by {down} (PATCH_SIZE {patch} x '
        f'2^{len(depths) - 1} patch merges) for MODEL.TYPE {config.MODEL.TYPE}; use e.g. '
        f'{max(down, img // down * down)}.',
    )
    for i, heads in enumerate(arch.NUM_HEADS):
        dim = arch.EMBED_DIM * 2**i
        require(
            dim % heads == 0,
            f'Stage {i} width {dim} (MODEL.{key}.EMBED_DIM x 2^{i}) is not '
            f'divisible by MODEL.{key}.NUM_HEADS[{i}] = {heads}.',
        )
        resolution = img // patch // 2**i
        window = min(arch.WINDOW_SIZE, resolution)
        require(
            resolution % window == 0,
            f'MODEL.{key}.WINDOW_SIZE {arch.WINDOW_SIZE} does not fit stage {i}: its feature map '
            f'is {resolution}x{resolution} (DATA.IMG_SIZE {img} / {patch * 2**i}), which a '
            f"{window}x{window} window does not tile. Pick a window that divides every stage's "
            f'map (e.g. 6 at 192, 7 at 224, 12 at 384) or change DATA.IMG_SIZE.',
        )


def check_swinv2(config):
    check_swin_family(config, 'SWINV2')
    arch = config.MODEL.SWINV2
    require(
        len(arch.PRETRAINED_WINDOW_SIZES) == len(arch.DEPTHS),
        f'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES needs one entry per stage ({len(arch.DEPTHS)}), '
        f'got {list(arch.PRETRAINED_WINDOW_SIZES)}.',
    )


def remap_swin(state_dict, model_state, patch_grid=None, logger=None):
    """Swin / SwinV2: released SwinV2 names (rpe_mlp -> cpb_mlp), index buffers dropped, relative
    position tables and absolute_pos_embed resized to the model's window / image size."""
    sd = drop_rebuilt_buffers(rename_released_keys(state_dict))
    resize_position_tables(sd, model_state, 0, None, logger)
    resize_pos_embed_entry(sd, model_state, 'absolute_pos_embed', 0, patch_grid, logger)
    return sd


register_architecture(
    Architecture(
        name='swin',
        config_key='SWIN',
        classifier=SwinTransformer,
        encoder=SwinTransformerForSimMIM,
        constructor_kwargs=lambda swin: dict(swin_family_kwargs(swin), qk_scale=swin.QK_SCALE),
        encoder_stride=swin_encoder_stride,
        num_layers=lambda swin: sum(swin.DEPTHS),
        layer_id=lambda name, swin: swin_layer_id(name, swin.DEPTHS),
        remap_checkpoint=remap_swin,
        check_config=lambda config: check_swin_family(config, 'SWIN'),
        official_no_weight_decay=(
            ('absolute_pos_embed',),
            ('relative_position_bias_table',),
            ('mask_token',),
        ),
        timm=timm_mapping.SWIN,
    )
)

register_architecture(
    Architecture(
        name='swinv2',
        config_key='SWINV2',
        classifier=SwinTransformerV2,
        encoder=SwinTransformerV2ForSimMIM,
        constructor_kwargs=lambda swin: dict(
            swin_family_kwargs(swin), pretrained_window_sizes=swin.PRETRAINED_WINDOW_SIZES
        ),
        encoder_stride=swin_encoder_stride,
        num_layers=lambda swin: sum(swin.DEPTHS),
        layer_id=lambda name, swin: swin_layer_id(name, swin.DEPTHS),
        remap_checkpoint=remap_swin,
        check_config=check_swinv2,
        official_no_weight_decay=(
            ('absolute_pos_embed',),
            ('cpb_mlp', 'logit_scale', 'relative_position_bias_table'),
            ('mask_token',),
        ),
        timm=timm_mapping.SWINV2,
    )
)


# -----------------------------------------------------------------------------------------------
# BEiT-style ViT
# -----------------------------------------------------------------------------------------------
def vit_kwargs(vit):
    return dict(
        patch_size=vit.PATCH_SIZE,
        in_chans=vit.IN_CHANS,
        embed_dim=vit.EMBED_DIM,
        depth=vit.DEPTH,
        num_heads=vit.NUM_HEADS,
        mlp_ratio=vit.MLP_RATIO,
        qkv_bias=vit.QKV_BIAS,
        init_values=vit.INIT_VALUES,
        use_abs_pos_emb=vit.USE_APE,
        use_rel_pos_bias=vit.USE_RPB,
        use_shared_rel_pos_bias=vit.USE_SHARED_RPB,
        use_mean_pooling=vit.USE_MEAN_POOLING,
    )


def vit_layer_id(name, depth):
    """0 for tokens, position embedding and patch embedding, i + 1 for blocks.i, L + 1 for the
    rest (shared rel_pos_bias, final norms, head)."""
    if name in ('cls_token', 'mask_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    match = re.match(r'blocks\.(\d+)\.', name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def check_vit(config):
    vit, img = config.MODEL.VIT, config.DATA.IMG_SIZE
    require(
        img % vit.PATCH_SIZE == 0,
        f'DATA.IMG_SIZE {img} must be divisible by MODEL.VIT.PATCH_SIZE {vit.PATCH_SIZE}.',
    )
    require(
        vit.EMBED_DIM % vit.NUM_HEADS == 0,
        f'MODEL.VIT.EMBED_DIM {vit.EMBED_DIM} must be '
        f'divisible by MODEL.VIT.NUM_HEADS {vit.NUM_HEADS}.',
    )
    check_init_values(vit.INIT_VALUES)


def remap_vit(state_dict, model_state, patch_grid=None, logger=None):
    """BEiT-style ViT: a shared relative position table is copied into every block when the model
    has per-block tables; tables and pos_embed are resized to the model's patch grid (h, w)."""
    sd = drop_rebuilt_buffers(dict(state_dict))
    block_tables = sorted(
        (
            k
            for k in model_state
            if re.fullmatch(r'blocks\.\d+\.attn\.relative_position_bias_table', k)
        ),
        key=lambda k: int(k.split('.')[1]),
    )
    if block_tables and SHARED_VIT_TABLE in sd and SHARED_VIT_TABLE not in model_state:
        shared = sd.pop(SHARED_VIT_TABLE)
        for key in block_tables:
            sd[key] = shared.clone()
        log_info(
            logger, f'Copied the shared {SHARED_VIT_TABLE} into the {len(block_tables)} blocks.'
        )
    resize_position_tables(sd, model_state, VIT_NUM_EXTRA_TOKENS, patch_grid, logger)
    resize_pos_embed_entry(sd, model_state, 'pos_embed', 1, patch_grid, logger)
    return sd


register_architecture(
    Architecture(
        name='vit',
        config_key='VIT',
        classifier=VisionTransformer,
        encoder=VisionTransformerForSimMIM,
        constructor_kwargs=vit_kwargs,
        encoder_stride=lambda vit: vit.PATCH_SIZE,
        num_layers=lambda vit: vit.DEPTH,
        layer_id=lambda name, vit: vit_layer_id(name, vit.DEPTH),
        remap_checkpoint=remap_vit,
        check_config=check_vit,
        official_no_weight_decay=(('pos_embed', 'cls_token'), (), ()),
        timm=timm_mapping.VIT,
    )
)
