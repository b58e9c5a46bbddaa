"""Build models from the config: one registry entry per MODEL.TYPE.

    build_model(config, is_pretrain=True)  SimMIM (pre-training) or the plain classifier
    build_encoder(config)                  the SimMIM encoder alone (num_classes=0)
    build_classifier(config)               the fine-tuning classifier
"""
from typing import Callable, NamedTuple

from .simmim import (SimMIM, SwinTransformerForSimMIM, SwinTransformerV2ForSimMIM,
                     VisionTransformerForSimMIM, build_criterion, build_decoder)
from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2
from .vision_transformer import VisionTransformer
from .window_attention import set_window_attention


def _swin_family_kwargs(swin):
    """Arguments shared by Swin V1 and V2 from their MODEL.SWIN / MODEL.SWINV2 node."""
    return dict(patch_size=swin.PATCH_SIZE, in_chans=swin.IN_CHANS, embed_dim=swin.EMBED_DIM,
                depths=swin.DEPTHS, num_heads=swin.NUM_HEADS, window_size=swin.WINDOW_SIZE,
                mlp_ratio=swin.MLP_RATIO, qkv_bias=swin.QKV_BIAS, ape=swin.APE,
                patch_norm=swin.PATCH_NORM)


def _swin_kwargs(config):
    return dict(_swin_family_kwargs(config.MODEL.SWIN), qk_scale=config.MODEL.SWIN.QK_SCALE)


def _swinv2_kwargs(config):
    return dict(_swin_family_kwargs(config.MODEL.SWINV2),
                pretrained_window_sizes=config.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES)


def _vit_kwargs(config):
    vit = config.MODEL.VIT
    return dict(patch_size=vit.PATCH_SIZE, in_chans=vit.IN_CHANS, embed_dim=vit.EMBED_DIM,
                depth=vit.DEPTH, num_heads=vit.NUM_HEADS, mlp_ratio=vit.MLP_RATIO,
                qkv_bias=vit.QKV_BIAS, init_values=vit.INIT_VALUES, use_abs_pos_emb=vit.USE_APE,
                use_rel_pos_bias=vit.USE_RPB, use_shared_rel_pos_bias=vit.USE_SHARED_RPB,
                use_mean_pooling=vit.USE_MEAN_POOLING)


class Architecture(NamedTuple):
    classifier: type  # fine-tuning model
    encoder: type  # SimMIM encoder: forward(x, mask) -> feature map
    kwargs: Callable  # config -> the architecture's constructor arguments


ARCHITECTURES = {
    'swin': Architecture(SwinTransformer, SwinTransformerForSimMIM, _swin_kwargs),
    'swinv2': Architecture(SwinTransformerV2, SwinTransformerV2ForSimMIM, _swinv2_kwargs),
    'vit': Architecture(VisionTransformer, VisionTransformerForSimMIM, _vit_kwargs),
}


def _architecture_kwargs(config):
    name = config.MODEL.TYPE
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown MODEL.TYPE '{name}'; valid types: {', '.join(ARCHITECTURES)}.")
    arch = ARCHITECTURES[name]
    kwargs = dict(img_size=config.DATA.IMG_SIZE, drop_rate=config.MODEL.DROP_RATE,
                  drop_path_rate=config.MODEL.DROP_PATH_RATE,
                  use_checkpoint=config.TRAIN.USE_CHECKPOINT, **arch.kwargs(config))
    return arch, kwargs


def build_encoder(config):
    """The SimMIM encoder of MODEL.TYPE (no classifier head)."""
    arch, kwargs = _architecture_kwargs(config)
    return arch.encoder(num_classes=0, **kwargs)


def build_classifier(config):
    """The fine-tuning classifier of MODEL.TYPE with MODEL.NUM_CLASSES outputs."""
    arch, kwargs = _architecture_kwargs(config)
    model = arch.classifier(num_classes=config.MODEL.NUM_CLASSES, **kwargs)
    return set_window_attention(model, config.MODEL.WINDOW_ATTENTION)


def build_simmim(config):
    encoder = build_encoder(config)
    model = SimMIM(encoder, build_decoder(config, encoder), build_criterion(config, encoder))
    return set_window_attention(model, config.MODEL.WINDOW_ATTENTION)


def build_model(config, is_pretrain=True):
    """SimMIM for pre-training (forward(x, mask) -> loss), else the classifier (forward(x) ->
    logits)."""
    return build_simmim(config) if is_pretrain else build_classifier(config)
