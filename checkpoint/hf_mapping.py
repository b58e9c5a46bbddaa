"""Our Swin / SwinV2 state dicts (the official SimMIM names) and Hugging Face transformers' (5.x).

    hf_config(config, num_classes)      transformers' SwinConfig / Swinv2Config equal to ours;
                                        raises UnsupportedInTransformers naming a key it lacks
    to_hf(state_dict, model_type)       our names -> transformers' (one model's prefix-free keys)
    from_hf(state_dict, model_type)     transformers' -> ours (to_hf's inverse)
    config_from_hf(hf_config)           our config keys ({'MODEL': ..., 'DATA': ...})

The mapping, read off transformers' modeling_swin.py / modeling_swinv2.py. Both down-sample at the
end of stage i like the official code and concatenate each 2x2 neighbourhood in the official
order, so no weight is permuted. Ours -> transformers (block names after
`encoder.layers.i.blocks.j.`; Swin | SwinV2 where they differ):

    mask_token, patch_embed.proj, patch_embed.norm -> embeddings.mask_token,
        embeddings.patch_embeddings.projection, embeddings.norm
    norm1, norm2 -> layernorm_before, layernorm_after (SwinV2's post-norms: the same places)
    attn.qkv (rows q, k, v) -> attention.{q,k,v}_proj | attention.self.{query,key,value}
    attn.q_bias, attn.v_bias (SwinV2) -> attention.self.query.bias, attention.self.value.bias
    attn.proj -> attention.o_proj | attention.output.dense
    attn.relative_position_bias_table (Swin) -> attention.relative_position_bias.(same)
    attn.logit_scale, attn.cpb_mlp (SwinV2) -> attention.self.logit_scale,
        attention.self.continuous_position_bias_mlp
    mlp.fc1, mlp.fc2 -> mlp.fc1, mlp.fc2 | intermediate.dense, output.dense
    layers.i.downsample, norm -> encoder.layers.i.downsample, layernorm
"""

import re

import torch
from transformers import SwinConfig, Swinv2Config

from utils.errors import ConfigError

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the official models use


class UnsupportedInTransformers(ConfigError):
    """A feature of our model that transformers' classes cannot represent; names the key."""


def _require(condition, message):
    if not condition:
        raise UnsupportedInTransformers(message)


# (our regex, transformers' template) per architecture; block-level names after the block prefix.
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
}
# Where the fused qkv of block (i, j) goes: the q, k and v row blocks.
QKV_TARGETS = {
    'swin': ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
    'swinv2': ('attention.self.query', 'attention.self.key', 'attention.self.value'),
}
HF_CONFIGS = {'swin': SwinConfig, 'swinv2': Swinv2Config}
ARCH_KEYS = {'swin': 'SWIN', 'swinv2': 'SWINV2'}
REBUILT = ('relative_position_index', 'relative_coords_table', 'attn_mask')  # buffers, not saved


def hf_names(key, model_type):
    """transformers' name(s) of our encoder tensor `key` (no 'encoder.' prefix; base model, no
    'swin.' prefix): one, or the q, k, v names a fused qkv tensor is split into; None for a
    rebuilt buffer. Raises UnsupportedInTransformers for a tensor with no counterpart."""
    if key.endswith(REBUILT):
        return None
    fused = re.fullmatch(_BLOCK + r'attn\.qkv\.(weight|bias)', key)
    if fused:
        stage, block, kind = fused.groups()
        prefix = f'encoder.layers.{stage}.blocks.{block}.'
        return [f'{prefix}{name}.{kind}' for name in QKV_TARGETS[model_type]]
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
    return out, [k for k in state_dict if k not in used and not k.endswith(REBUILT)]


def _stage_sizes(config, arch):
    grid = config.DATA.IMG_SIZE // arch.PATCH_SIZE
    return [grid // 2**i for i in range(len(arch.DEPTHS))]


def hf_config(config, num_classes=0):
    """transformers' config equal to our MODEL.TYPE swin / swinv2 model of `config`."""
    model_type = config.MODEL.TYPE
    _require(
        model_type in HF_CONFIGS,
        f"MODEL.TYPE '{model_type}': the transformers export covers swin and swinv2 "
        f'(SwinFor* / Swinv2For* classes); a ViT goes to timm (--to timm).',
    )
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


def config_from_hf(hf):
    """Our config keys ({'MODEL': ..., 'DATA': ...}) for transformers' Swin / Swinv2 config."""
    model_type = {'swin': 'swin', 'swinv2': 'swinv2'}.get(hf.model_type)
    _require(model_type is not None, f"transformers model_type '{hf.model_type}': not swin/swinv2")
    _require(not hf.use_absolute_embeddings, 'use_absolute_embeddings: not in our Swin')
    _require(hf.hidden_act == 'gelu', f"hidden_act '{hf.hidden_act}': ours is exact GELU")
    _require(
        abs(hf.layer_norm_eps - LAYER_NORM_EPS) < 1e-12,
        f'layer_norm_eps {hf.layer_norm_eps}: ours is {LAYER_NORM_EPS}',
    )
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
