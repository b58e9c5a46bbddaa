"""Our Swin / SwinV2 / ViT (the official SimMIM names and configs) and Hugging Face
transformers' Swin / Swinv2 / Beit (5.x), both ways.

    hf_config(config, num_classes=0)    transformers' config equal to ours; raises
                                        UnsupportedInTransformers naming a key it lacks
    hf_names(key, model_type)           transformers' name(s) of one of our encoder tensors
    to_hf(state_dict, model_type)       our encoder's names -> transformers' base model's
    from_hf(state_dict, our_keys, model_type)   the inverse, for the keys our model has
    config_from_hf(hf_config)           our config keys ({'MODEL': ..., 'DATA': ...})

The names were read off transformers' modeling_swin.py, modeling_swinv2.py and modeling_beit.py;
the table of what maps to what is in docs/interop.md (Hugging Face transformers). Both libraries
down-sample at the end of a stage and concatenate each 2x2 neighbourhood in the official order, so
no weight is permuted; only the fused qkv is split into three projections.
"""

import re
from functools import partial

import torch
from transformers import BeitConfig, SwinConfig, Swinv2Config

from models.vision_transformer import mlp_ratio_of
from utils.errors import ConfigError, require
from utils.state_dict import REBUILT_BUFFERS

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the official Swin models use
VIT_LAYER_NORM_EPS = 1e-6  # the official ViT's (models/vision_transformer.py)


class UnsupportedInTransformers(ConfigError):
    """A feature of our model that transformers' classes cannot represent; names the key."""


_require = partial(require, error=UnsupportedInTransformers)


# (our regex, transformers' template) per architecture; block-level names after the block prefix.
SHARED_RPB = r'rel_pos_bias\.relative_position_bias_table'
_BLOCK = r'layers\.(\d+)\.blocks\.(\d+)\.'
_HF_BLOCK = r'encoder.layers.\1.blocks.\2.'
_COMMON = [
    (r'mask_token', 'embeddings.mask_token'),
    (r'patch_embed\.proj\.(\w+)', r'embeddings.patch_embeddings.projection.\1'),
    (r'patch_embed\.norm\.(\w+)', r'embeddings.norm.\1'),
    (_BLOCK + r'norm1\.(\w+)', _HF_BLOCK + r'layernorm_before.\3'),
    (_BLOCK + r'norm2\.(\w+)', _HF_BLOCK + r'layernorm_after.\3'),
    (r'layers\.(\d+)\.downsample\.(.+)', r'encoder.layers.\1.downsample.\2'),
    (r'norm\.(\w+)', r'layernorm.\1'),
]
RENAMES = {
    'swin': _COMMON
    + [
        (_BLOCK + r'attn\.proj\.(\w+)', _HF_BLOCK + r'attention.o_proj.\3'),
        (
            _BLOCK + r'attn\.relative_position_bias_table',
            _HF_BLOCK + r'attention.relative_position_bias.relative_position_bias_table',
        ),
        (_BLOCK + r'mlp\.(fc\d)\.(\w+)', _HF_BLOCK + r'mlp.\3.\4'),
    ],
    'swinv2': _COMMON
    + [
        (_BLOCK + r'attn\.proj\.(\w+)', _HF_BLOCK + r'attention.output.dense.\3'),
        (_BLOCK + r'attn\.logit_scale', _HF_BLOCK + r'attention.self.logit_scale'),
        (
            _BLOCK + r'attn\.cpb_mlp\.(\d)\.(\w+)',
            _HF_BLOCK + r'attention.self.continuous_position_bias_mlp.\3.\4',
        ),
        (_BLOCK + r'attn\.q_bias', _HF_BLOCK + r'attention.self.query.bias'),
        (_BLOCK + r'attn\.v_bias', _HF_BLOCK + r'attention.self.value.bias'),
        (_BLOCK + r'mlp\.fc1\.(\w+)', _HF_BLOCK + r'intermediate.dense.\3'),
        (_BLOCK + r'mlp\.fc2\.(\w+)', _HF_BLOCK + r'output.dense.\3'),
    ],
    'vit': [
        (r'(cls_token|mask_token)', r'embeddings.\1'),
        (r'pos_embed', 'embeddings.position_embeddings'),
        (r'patch_embed\.proj\.(\w+)', r'embeddings.patch_embeddings.projection.\1'),
        (SHARED_RPB, 'shared_position_bias.relative_position_bias_table'),
        (r'blocks\.(\d+)\.gamma_(\d)', r'layers.\1.lambda_\2'),
        (r'blocks\.(\d+)\.norm1\.(\w+)', r'layers.\1.layernorm_before.\2'),
        (r'blocks\.(\d+)\.norm2\.(\w+)', r'layers.\1.layernorm_after.\2'),
        (r'blocks\.(\d+)\.attn\.(q|v)_bias', r'layers.\1.attention.\2_proj.bias'),
        (r'blocks\.(\d+)\.attn\.proj\.(\w+)', r'layers.\1.attention.o_proj.\2'),
        (
            r'blocks\.(\d+)\.attn\.relative_position_bias_table',
            r'layers.\1.relative_position_bias.relative_position_bias_table',
        ),
        (r'blocks\.(\d+)\.mlp\.(fc\d)\.(\w+)', r'layers.\1.mlp.\2.\3'),
        (r'norm\.(\w+)', r'layernorm.\1'),
        (r'fc_norm\.(\w+)', r'pooler.layernorm.\1'),
    ],
}
# A fused qkv tensor: (our regex, transformers' block prefix, the q, k and v names in the block).
FUSED_QKV = {
    'swin': (_BLOCK, _HF_BLOCK, ('attention.q_proj', 'attention.k_proj', 'attention.v_proj')),
    'swinv2': (
        _BLOCK,
        _HF_BLOCK,
        ('attention.self.query', 'attention.self.key', 'attention.self.value'),
    ),
    'vit': (
        r'blocks\.(\d+)\.',
        r'layers.\1.',
        ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
    ),
}
HF_CONFIGS = {'swin': SwinConfig, 'swinv2': Swinv2Config, 'vit': BeitConfig}
ARCH_KEYS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'vit': 'VIT'}


def hf_names(key, model_type):
    """transformers' name(s) of our encoder tensor `key` (no 'encoder.' prefix; base model, no
    'swin.' prefix): one, or the q, k, v names a fused qkv tensor is split into; None for a
    rebuilt buffer. Raises UnsupportedInTransformers for a tensor with no counterpart."""
    if key.endswith(REBUILT_BUFFERS):
        return None
    block, hf_block, names = FUSED_QKV[model_type]
    fused = re.fullmatch(block + r'attn\.qkv\.(weight|bias)', key)
    if fused:
        prefix = fused.expand(hf_block)
        return [f'{prefix}{name}.{fused.groups()[-1]}' for name in names]
    for pattern, template in RENAMES[model_type]:
        if re.fullmatch(pattern, key):
            return [re.sub(f'^{pattern}$', template, key)]
    raise UnsupportedInTransformers(f'no transformers name for our tensor {key}')


def to_hf(state_dict, model_type):
    """Our encoder's weights (no 'encoder.' prefix) under transformers' base-model names (no
    'swin.' prefix); rebuilt buffers are left out, each fused qkv is split into q, k, v."""
    out = {}
    for key, value in state_dict.items():
        names = hf_names(key, model_type)
        if names is None:
            continue
        parts = value.chunk(3) if len(names) == 3 else [value]
        out.update({name: part.clone() for name, part in zip(names, parts, strict=True)})
    return out


def from_hf(state_dict, our_keys, model_type):
    """The tensors of `our_keys` (our encoder's names) from transformers' base-model weights
    `state_dict`: to_hf's inverse. Returns (weights, transformers keys nothing of ours took)."""
    out, used = {}, set()
    for key in our_keys:
        names = hf_names(key, model_type)
        if names is None:
            continue
        missing = [n for n in names if n not in state_dict]
        _require(not missing, f'the transformers weights lack {", ".join(missing)} (our {key})')
        out[key] = (
            torch.cat([state_dict[n] for n in names]) if len(names) > 1 else state_dict[names[0]]
        )
        used.update(names)
    return out, [k for k in state_dict if k not in used and not k.endswith(REBUILT_BUFFERS)]


def _stage_sizes(config, arch):
    grid = config.DATA.IMG_SIZE // arch.PATCH_SIZE
    return [grid // 2**i for i in range(len(arch.DEPTHS))]


def hf_config(config, num_classes=0):
    """transformers' config equal to our model of `config` (MODEL.TYPE swin, swinv2, vit)."""
    model_type = config.MODEL.TYPE
    _require(
        model_type in HF_CONFIGS,
        f"MODEL.TYPE '{model_type}': the transformers export covers swin, swinv2 and vit.",
    )
    if model_type == 'vit':
        return _beit_config(config, num_classes)
    key = ARCH_KEYS[model_type]
    arch = config.MODEL[key]
    _require(
        not arch.APE,
        f"MODEL.{key}.APE: transformers' absolute embedding has an extra "
        'position (num_patches + 1) the official one lacks, so the export would differ.',
    )
    _require(
        arch.PATCH_NORM,
        f'MODEL.{key}.PATCH_NORM False: transformers always normalises the patch embedding.',
    )
    if model_type == 'swin':
        _require(
            arch.QK_SCALE is None,
            f'MODEL.SWIN.QK_SCALE {arch.QK_SCALE}: transformers '
            'always scales attention by head_dim ** -0.5.',
        )
    small = [(i, s) for i, s in enumerate(_stage_sizes(config, arch)) if s < arch.WINDOW_SIZE]
    _require(
        not small,
        f'MODEL.{key}.WINDOW_SIZE {arch.WINDOW_SIZE} with DATA.IMG_SIZE {config.DATA.IMG_SIZE}: '
        f'stage {small[0][0] if small else 0} is a {small[0][1] if small else 0}-patch map, '
        "smaller than the window. The official model shrinks that stage's window and position "
        'table to the map; transformers keeps one window size for every stage, so the model it '
        'builds differs. Export a model whose maps are all at least a window wide.',
    )
    kwargs = dict(
        image_size=config.DATA.IMG_SIZE,
        patch_size=arch.PATCH_SIZE,
        num_channels=arch.IN_CHANS,
        embed_dim=arch.EMBED_DIM,
        depths=list(arch.DEPTHS),
        num_heads=list(arch.NUM_HEADS),
        window_size=arch.WINDOW_SIZE,
        mlp_ratio=arch.MLP_RATIO,
        qkv_bias=arch.QKV_BIAS,
        hidden_dropout_prob=config.MODEL.DROP_RATE,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        hidden_act='gelu',
        use_absolute_embeddings=False,
        layer_norm_eps=LAYER_NORM_EPS,
        encoder_stride=arch.PATCH_SIZE * 2 ** (len(arch.DEPTHS) - 1),
    )
    if model_type == 'swinv2':
        kwargs['pretrained_window_sizes'] = list(arch.PRETRAINED_WINDOW_SIZES)
    if num_classes:
        kwargs['num_labels'] = num_classes
    return HF_CONFIGS[model_type](**kwargs)


def _beit_config(config, num_classes):
    """BeitConfig of our ViT (timm's Beit plus the mask token: the same model as transformers')."""
    vit = config.MODEL.VIT
    _require(
        vit.QKV_BIAS,
        "MODEL.VIT.QKV_BIAS False: transformers' Beit always has query and value biases.",
    )
    _require(
        float(vit.MLP_RATIO * vit.EMBED_DIM).is_integer(),
        f'MODEL.VIT.MLP_RATIO {vit.MLP_RATIO}: the hidden width must be a whole number.',
    )
    kwargs = dict(
        image_size=config.DATA.IMG_SIZE,
        patch_size=vit.PATCH_SIZE,
        num_channels=vit.IN_CHANS,
        hidden_size=vit.EMBED_DIM,
        num_hidden_layers=vit.DEPTH,
        num_attention_heads=vit.NUM_HEADS,
        intermediate_size=int(vit.MLP_RATIO * vit.EMBED_DIM),
        hidden_act='gelu',
        hidden_dropout_prob=config.MODEL.DROP_RATE,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        layer_norm_eps=VIT_LAYER_NORM_EPS,
        use_mask_token=not num_classes,  # SimMIM's encoder has one, the classifier not
        use_absolute_position_embeddings=vit.USE_APE,
        use_relative_position_bias=vit.USE_RPB,
        use_shared_relative_position_bias=vit.USE_SHARED_RPB,
        layer_scale_init_value=vit.INIT_VALUES or 0.0,
        use_mean_pooling=vit.USE_MEAN_POOLING,
    )
    if num_classes:
        kwargs['num_labels'] = num_classes
    return BeitConfig(**kwargs)


def _check_layers(hf, layer_norm_eps):
    """The activation and LayerNorm eps transformers' config may vary and ours fixes."""
    _require(hf.hidden_act == 'gelu', f"hidden_act '{hf.hidden_act}': ours is exact GELU")
    _require(
        abs(hf.layer_norm_eps - layer_norm_eps) < 1e-12,
        f'layer_norm_eps {hf.layer_norm_eps}: ours is {layer_norm_eps}',
    )


def _config_from_beit(hf):
    _check_layers(hf, VIT_LAYER_NORM_EPS)
    vit = {
        'PATCH_SIZE': hf.patch_size,
        'IN_CHANS': hf.num_channels,
        'EMBED_DIM': hf.hidden_size,
        'DEPTH': hf.num_hidden_layers,
        'NUM_HEADS': hf.num_attention_heads,
        'MLP_RATIO': mlp_ratio_of(hf.intermediate_size, hf.hidden_size),
        'INIT_VALUES': hf.layer_scale_init_value or None,
        'USE_APE': bool(hf.use_absolute_position_embeddings),
        'USE_RPB': bool(hf.use_relative_position_bias),
        'USE_SHARED_RPB': bool(hf.use_shared_relative_position_bias),
        'USE_MEAN_POOLING': bool(hf.use_mean_pooling),
    }
    return {'MODEL': {'TYPE': 'vit', 'VIT': vit}, 'DATA': {'IMG_SIZE': hf.image_size}}


def config_from_hf(hf):
    """Our config keys ({'MODEL': ..., 'DATA': ...}) for transformers' Swin / Swinv2 / Beit
    config."""
    if hf.model_type == 'beit':
        return _config_from_beit(hf)
    model_type = {'swin': 'swin', 'swinv2': 'swinv2'}.get(hf.model_type)
    _require(model_type is not None, f"transformers model_type '{hf.model_type}': not ours")
    _require(not hf.use_absolute_embeddings, 'use_absolute_embeddings: not in our Swin')
    _check_layers(hf, LAYER_NORM_EPS)
    arch = {
        'PATCH_SIZE': hf.patch_size,
        'IN_CHANS': hf.num_channels,
        'EMBED_DIM': hf.embed_dim,
        'DEPTHS': list(hf.depths),
        'NUM_HEADS': list(hf.num_heads),
        'WINDOW_SIZE': hf.window_size,
        'MLP_RATIO': float(hf.mlp_ratio),
        'QKV_BIAS': bool(hf.qkv_bias),
    }
    if model_type == 'swinv2':
        arch['PRETRAINED_WINDOW_SIZES'] = list(hf.pretrained_window_sizes)
    return {
        'MODEL': {'TYPE': model_type, ARCH_KEYS[model_type]: arch},
        'DATA': {'IMG_SIZE': hf.image_size},
    }
