"""Encoders between this framework's layout (the official SimMIM state-dict names) and timm 1.0's.

One TimmInterop per architecture (SWIN, SWINV2, VIT), held by its registry entry as `timm`
(models/architectures.py):
    timm_model(config) -> (architecture, model_args)   the timm model equal to ours; raises
                                                       UnsupportedInTimm naming a key timm lacks
    to_timm(state_dict, config) -> state dict under timm's names
    from_timm(state_dict)       -> back under ours (to_timm's inverse)
    config_from_timm(model)     -> our config keys ({'MODEL': ..., 'DATA': ...}) for a timm model
    timm_classes                   the timm model classes this type is read from

The mappings:
- swin, swinv2: the official code down-samples at the end of stage i (`layers.{i}.downsample`),
  timm at the start of stage i+1 (`layers.{i+1}.downsample`); the classifier `head` is timm's
  `head.fc`. Every other tensor (SwinV2's cpb_mlp, logit_scale, q_bias/v_bias and post-norms
  included) keeps its name and value: timm's PatchMerging concatenates each 2x2 neighbourhood in
  the official channel order ((0,0), (1,0), (0,1), (1,1)), so no weight is permuted.
- vit -> timm beit_*: the same names (timm's Beit is the model the official ViT was taken from).
- vit -> timm vit_*, used when the config has no relative position bias at all: layer scale
  gamma_{1,2} -> ls{1,2}.gamma, and q_bias / v_bias -> qkv.bias = [q_bias, 0, v_bias]. Going back,
  a key bias is dropped: it adds q.b_k to every logit of a query's row, which softmax ignores.
"""

import re
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import timm
import torch
from timm.layers import to_2tuple
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from timm.models.vision_transformer import VisionTransformer as TimmViT

from utils.errors import ConfigError, require

from .vision_transformer import mlp_ratio_of

# Size words of timm's model names, by (embed_dim, depths) of Swin and (embed_dim, depth) of ViT.
SWIN_SIZES = {
    (96, (2, 2, 6, 2)): 'tiny',
    (96, (2, 2, 18, 2)): 'small',
    (128, (2, 2, 18, 2)): 'base',
    (192, (2, 2, 18, 2)): 'large',
}
VIT_SIZES = {
    (192, 12): 'tiny',
    (384, 12): 'small',
    (768, 12): 'base',
    (1024, 24): 'large',
    (1280, 32): 'huge',
}


class UnsupportedInTimm(ConfigError):
    """A model feature the other side cannot represent; the message names the key."""


_require = partial(require, error=UnsupportedInTimm)


def _first_registered(candidates):
    """The first timm model name that exists. timm builds any size from model_args; the name only
    picks the model class and a default pretrained_cfg, so the closest named variant is used."""
    return next(name for name in candidates if timm.is_model(name))


# -----------------------------------------------------------------------------------------------
# Swin and SwinV2
# -----------------------------------------------------------------------------------------------
def _swin_family_args(config, key):
    arch = config.MODEL[key]
    _require(
        not arch.APE,
        f"MODEL.{key}.APE is True, but timm's Swin has no absolute position embedding.",
    )
    _require(
        arch.PATCH_NORM,
        f"MODEL.{key}.PATCH_NORM is False, but timm's Swin always normalises the patch embedding.",
    )
    return dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=arch.PATCH_SIZE,
        in_chans=arch.IN_CHANS,
        embed_dim=arch.EMBED_DIM,
        depths=list(arch.DEPTHS),
        num_heads=list(arch.NUM_HEADS),
        window_size=arch.WINDOW_SIZE,
        mlp_ratio=float(arch.MLP_RATIO),
        qkv_bias=bool(arch.QKV_BIAS),
    )


def _swin_timm_model(config):
    swin = config.MODEL.SWIN
    _require(
        swin.QK_SCALE is None,
        f"MODEL.SWIN.QK_SCALE is {swin.QK_SCALE}, but timm's Swin "
        f'always scales attention by head_dim ** -0.5.',
    )
    size = SWIN_SIZES.get((swin.EMBED_DIM, tuple(swin.DEPTHS)), 'tiny')
    name = _first_registered(
        [
            f'swin_{size}_patch{swin.PATCH_SIZE}_window{swin.WINDOW_SIZE}_{config.DATA.IMG_SIZE}',
            f'swin_{size}_patch4_window7_224',
            'swin_tiny_patch4_window7_224',
        ]
    )
    return name, _swin_family_args(config, 'SWIN')


def _swinv2_timm_model(config):
    swin = config.MODEL.SWINV2
    size = SWIN_SIZES.get((swin.EMBED_DIM, tuple(swin.DEPTHS)), 'tiny')
    name = _first_registered(
        [
            f'swinv2_{size}_window{swin.WINDOW_SIZE}_{config.DATA.IMG_SIZE}',
            *timm.list_models(f'swinv2_{size}_window*'),
            'swinv2_tiny_window8_256',
        ]
    )
    args = _swin_family_args(config, 'SWINV2')
    args['pretrained_window_sizes'] = list(swin.PRETRAINED_WINDOW_SIZES)
    return name, args


def _move_downsample(key, offset):
    match = re.match(r'layers\.(\d+)\.downsample\.', key)
    if match is None:
        return key
    return f'layers.{int(match.group(1)) + offset}.downsample.{key[match.end() :]}'


def _replace_prefix(key, old, new):
    return new + key[len(old) :] if key.startswith(old) else key


def _swin_to_timm(state_dict, config=None):
    return {
        _replace_prefix(_move_downsample(k, +1), 'head.', 'head.fc.'): v
        for k, v in state_dict.items()
    }


def _swin_from_timm(state_dict):
    return {
        _replace_prefix(_move_downsample(k, -1), 'head.fc.', 'head.'): v
        for k, v in state_dict.items()
    }


def _one_window(model):
    """The window of a timm Swin (ours has one for all stages; both clamp it on small maps)."""
    windows = {tuple(to_2tuple(w)) for w in model._ref_window_sizes}  # as built, before clamping
    _require(
        len(windows) == 1 and len(set(*windows)) == 1,
        f"The timm model's windows are {sorted(windows)}; MODEL.SWIN.WINDOW_SIZE is one square "
        f'window for all stages.',
    )
    return next(iter(windows))[0]


def _swin_family_config(model, key):
    _require(not model.dynamic_img_size, 'The timm Swin has a dynamic image size; ours is fixed.')
    _require(
        model.global_pool == 'avg' or not model.num_classes,
        f"timm global_pool '{model.global_pool}': our Swin classifier average-pools.",
    )
    first = model.layers[0].blocks[0]
    _require(
        not first.always_partition,
        'The timm Swin always partitions into full windows; ours '
        'shrinks a window to a smaller feature map.',
    )
    embed = model.patch_embed
    _require(
        embed.patch_size[0] == embed.patch_size[1] and embed.img_size[0] == embed.img_size[1],
        f'timm patch {embed.patch_size} / image {embed.img_size} are not square.',
    )
    return {
        'MODEL': {
            'TYPE': key.lower(),
            'NUM_CLASSES': model.num_classes,
            key: {
                'PATCH_SIZE': embed.patch_size[0],
                'IN_CHANS': model.in_chans,
                'EMBED_DIM': model.embed_dim,
                'DEPTHS': [len(stage.blocks) for stage in model.layers],
                'NUM_HEADS': [stage.blocks[0].attn.num_heads for stage in model.layers],
                'WINDOW_SIZE': _one_window(model),
                'MLP_RATIO': first.mlp_ratio,
                'QKV_BIAS': _has_qkv_bias(first.attn),
            },
        },
        'DATA': {'IMG_SIZE': embed.img_size[0]},
    }


def _has_qkv_bias(attn):
    return getattr(attn, 'q_bias', None) is not None or attn.qkv.bias is not None


def _swin_config(model):
    return _swin_family_config(model, 'SWIN')


def _swinv2_config(model):
    config = _swin_family_config(model, 'SWINV2')
    config['MODEL']['SWINV2']['PRETRAINED_WINDOW_SIZES'] = [
        stage.blocks[0].attn.pretrained_window_size[0] for stage in model.layers
    ]
    return config


# -----------------------------------------------------------------------------------------------
# ViT (BEiT-style) -> timm Beit, or timm VisionTransformer without relative position bias
# -----------------------------------------------------------------------------------------------
def _vit_is_plain(config):
    return not (config.MODEL.VIT.USE_RPB or config.MODEL.VIT.USE_SHARED_RPB)


def _vit_timm_model(config):
    vit = config.MODEL.VIT
    _require(
        vit.INIT_VALUES is None or vit.INIT_VALUES > 0,
        f'MODEL.VIT.INIT_VALUES {vit.INIT_VALUES}: timm turns layer scale off for 0; use None.',
    )
    size = VIT_SIZES.get((vit.EMBED_DIM, vit.DEPTH), 'base')
    family = 'vit' if _vit_is_plain(config) else 'beit'
    name = _first_registered(
        [
            f'{family}_{size}_patch{vit.PATCH_SIZE}_{config.DATA.IMG_SIZE}',
            f'{family}_{size}_patch16_224',
            f'{family}_base_patch16_224',
        ]
    )
    args = dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=vit.PATCH_SIZE,
        in_chans=vit.IN_CHANS,
        embed_dim=vit.EMBED_DIM,
        depth=vit.DEPTH,
        num_heads=vit.NUM_HEADS,
        mlp_ratio=float(vit.MLP_RATIO),
        qkv_bias=bool(vit.QKV_BIAS),
        init_values=vit.INIT_VALUES,
        global_pool='avg' if vit.USE_MEAN_POOLING else 'token',
    )
    if family == 'vit':
        args.update(pos_embed='learn' if vit.USE_APE else 'none', class_token=True)
    else:
        args.update(
            use_abs_pos_emb=bool(vit.USE_APE),
            use_rel_pos_bias=bool(vit.USE_RPB),
            use_shared_rel_pos_bias=bool(vit.USE_SHARED_RPB),
        )
    return name, args


def _vit_to_timm(state_dict, config):
    if not _vit_is_plain(config):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.endswith('.attn.v_bias'):
            continue
        if key.endswith('.attn.q_bias'):
            block = key[: -len('q_bias')]
            out[block + 'qkv.bias'] = torch.cat(
                [value, torch.zeros_like(value), state_dict[block + 'v_bias']]
            )
        else:
            out[re.sub(r'\.gamma_([12])$', r'.ls\1.gamma', key)] = value
    return out


def _vit_from_timm(state_dict):
    out = {}
    for key, value in state_dict.items():
        if key.endswith('.attn.qkv.bias'):
            block, dim = key[: -len('qkv.bias')], value.shape[0] // 3
            out[block + 'q_bias'], out[block + 'v_bias'] = value[:dim], value[2 * dim :]
        else:
            out[re.sub(r'\.ls([12])\.gamma$', r'.gamma_\1', key)] = value
    return out


def _vit_config(model):
    embed, first = model.patch_embed, model.blocks[0]
    _require(
        embed.patch_size[0] == embed.patch_size[1] and embed.img_size[0] == embed.img_size[1],
        f'timm patch {embed.patch_size} / image {embed.img_size} are not square.',
    )
    _require(
        model.global_pool in ('avg', 'token'),
        f"timm global_pool '{model.global_pool}': ours is mean pooling or the cls token.",
    )
    mean_pooling = model.global_pool == 'avg'
    _require(
        isinstance(model.fc_norm, torch.nn.LayerNorm) == mean_pooling,
        'timm fc_norm must be used exactly with average pooling, as in our ViT.',
    )
    if isinstance(model, Beit):
        rpb = first.attn.relative_position_bias_table is not None
        shared_rpb, ape = model.rel_pos_bias is not None, model.pos_embed is not None
        layer_scale = first.gamma_1 is not None
    else:
        _require(
            model.has_class_token
            and not model.num_reg_tokens
            and not model.no_embed_class
            and isinstance(model.norm_pre, torch.nn.Identity)
            and model.attn_pool is None
            and not model.dynamic_img_size,
            'The timm ViT has register tokens, no class token, a pre-norm, attention '
            'pooling, a dynamic image size or position embeddings without the class token; '
            'ours has none of these.',
        )
        rpb, shared_rpb, ape = False, False, model.pos_embed is not None
        layer_scale = hasattr(first.ls1, 'gamma')
    init_values = getattr(first, 'init_values', None) or 0.1
    return {
        'MODEL': {
            'TYPE': 'vit',
            'NUM_CLASSES': model.num_classes,
            'VIT': {
                'PATCH_SIZE': embed.patch_size[0],
                'IN_CHANS': model.in_chans,
                'EMBED_DIM': model.embed_dim,
                'DEPTH': len(model.blocks),
                'NUM_HEADS': first.attn.num_heads,
                'MLP_RATIO': mlp_ratio_of(first.mlp.fc1.out_features, model.embed_dim),
                'QKV_BIAS': _has_qkv_bias(first.attn),
                'INIT_VALUES': init_values if layer_scale else None,
                'USE_APE': ape,
                'USE_RPB': rpb,
                'USE_SHARED_RPB': shared_rpb,
                'USE_MEAN_POOLING': mean_pooling,
            },
        },
        'DATA': {'IMG_SIZE': embed.img_size[0]},
    }


# -----------------------------------------------------------------------------------------------
# The table
# -----------------------------------------------------------------------------------------------
class TimmInterop(NamedTuple):
    timm_model: Callable  # config -> (architecture, model_args)
    to_timm: Callable  # (state_dict, config) -> timm state dict
    from_timm: Callable  # timm state dict -> ours
    config_from_timm: Callable  # timm model -> {'MODEL': ..., 'DATA': ...}
    timm_classes: tuple


SWIN = TimmInterop(_swin_timm_model, _swin_to_timm, _swin_from_timm, _swin_config, (TimmSwin,))
SWINV2 = TimmInterop(
    _swinv2_timm_model, _swin_to_timm, _swin_from_timm, _swinv2_config, (TimmSwinV2,)
)
VIT = TimmInterop(_vit_timm_model, _vit_to_timm, _vit_from_timm, _vit_config, (Beit, TimmViT))
