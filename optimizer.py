"""The optimizer: weight-decay parameter groups, layer-wise LR decay, AdamW / SGD / LARS.

Public entry points:
    build_optimizer(config, model, logger=None, is_pretrain=True)
    build_param_groups(config, model, is_pretrain=True)   the groups build_optimizer uses
    layer_lr_scales(config, model)                         {param_name: lr_scale}, for inspection
    supports_found_inf(optimizer)                          whether step() honours `found_inf`

Choices (reference section 5):
- A parameter gets no weight decay if it is 1-D (or 0-D), its name ends with '.bias', it is named by
  ``model.no_weight_decay()`` or contains a keyword of ``model.no_weight_decay_keywords()``: so
  position tables (Swin, SwinV2 and ViT, shared or per block), SwinV2 ``logit_scale`` and
  ``cpb_mlp``, and mask tokens are never decayed, in pre-training and fine-tuning. The official
  code decayed some of them: in pre-training it prefixed the keywords with 'encoder.' (Swin
  relative-position tables, ``logit_scale``, ``cpb_mlp``; Swin-Transformer issue #369) and its ViT
  named neither the mask token nor any position table (SimMIM #26), in fine-tuning too.
  TRAIN.WEIGHT_DECAY_RULES official reproduces that membership
  (``official_names_without_weight_decay``). Frozen parameters are left out.
- Layer-wise LR decay (fine-tuning, TRAIN.LAYER_DECAY != 1) uses the official layer ids
  (``LAYER_ID_FUNCTIONS``): scale = LAYER_DECAY ** (L + 1 - layer_id), L = number of blocks.
  Each group carries ``lr = BASE_LR * lr_scale`` and ``lr_scale``. The scale is applied exactly
  once: our scheduler (lr_scheduler.py) takes each group's starting lr as its peak and never
  multiplies by 'lr_scale' again (timm >= 0.6 schedulers would, giving scale**2).
- Every group has the keys group_name, params, param_names, weight_decay, lr, lr_scale, in the
  order their first parameter appears in ``model.named_parameters()``; empty groups are omitted.
- AdamW and SGD use the fused kernels whenever every parameter is a floating-point tensor on CPU
  or CUDA (else foreach). The fused kernels skip a step on device when the training loop sets
  ``optimizer.found_inf`` to a non-zero tensor, without a host sync; ``supports_found_inf`` says
  whether that is available. LARS (timm, for linear probing) adapts the decay groups (weight
  matrices) whatever the weight decay, and never the no-decay groups, as MAE's LARS.
"""
import re
from typing import Callable, NamedTuple

import torch
from timm.optim import Lars

from utils.distributed import unwrap_model

# -----------------------------------------------------------------------------------------------
# Layer ids for layer-wise LR decay (official get_swin_layer / get_vit_layer, reference 5.2)
# -----------------------------------------------------------------------------------------------


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
        return sum(depths[:stage + 1])  # patch merging shares the id of its stage's last block
    return num_blocks + 1


def vit_layer_id(name, depth):
    """0 for tokens, position embedding and patch embedding, i + 1 for blocks.i, L + 1 for the
    rest (shared rel_pos_bias, final norms, head)."""
    if name in ('cls_token', 'mask_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    match = re.match(r'blocks\.(\d+)\.', name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


class LayerIds(NamedTuple):
    of_param: Callable  # (param_name, config) -> layer id in 0 .. L + 1
    num_blocks: Callable  # config -> L


LAYER_ID_FUNCTIONS = {  # keyed by MODEL.TYPE
    'swin': LayerIds(lambda name, cfg: swin_layer_id(name, cfg.MODEL.SWIN.DEPTHS),
                     lambda cfg: sum(cfg.MODEL.SWIN.DEPTHS)),
    'swinv2': LayerIds(lambda name, cfg: swin_layer_id(name, cfg.MODEL.SWINV2.DEPTHS),
                       lambda cfg: sum(cfg.MODEL.SWINV2.DEPTHS)),
    'vit': LayerIds(lambda name, cfg: vit_layer_id(name, cfg.MODEL.VIT.DEPTH),
                    lambda cfg: cfg.MODEL.VIT.DEPTH),
}


def _uses_layer_decay(config, is_pretrain):
    return not is_pretrain and config.TRAIN.LAYER_DECAY != 1.0


def layer_lr_scales(config, model):
    """{param_name: LAYER_DECAY ** (L + 1 - layer_id)} for every trainable parameter."""
    layer_ids = LAYER_ID_FUNCTIONS[config.MODEL.TYPE]
    top = layer_ids.num_blocks(config) + 1
    decay = config.TRAIN.LAYER_DECAY
    return {name: decay ** (top - layer_ids.of_param(name, config))
            for name, p in unwrap_model(model).named_parameters() if p.requires_grad}


# -----------------------------------------------------------------------------------------------
# Parameter groups
# -----------------------------------------------------------------------------------------------


def _names_without_weight_decay(model):
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    keywords = (set(model.no_weight_decay_keywords())
                if hasattr(model, 'no_weight_decay_keywords') else set())
    return skip, keywords


# The official backbones' no_weight_decay() and no_weight_decay_keywords(), by MODEL.TYPE.
OFFICIAL_NO_WEIGHT_DECAY = {
    'swin': ({'absolute_pos_embed'}, {'relative_position_bias_table'}),
    'swinv2': ({'absolute_pos_embed'}, {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}),
    'vit': ({'pos_embed', 'cls_token'}, set()),
}


def official_names_without_weight_decay(config, is_pretrain):
    """(names, keywords) as the official build_optimizer saw them. In pre-training the SimMIM
    wrapper prefixed both with 'encoder.', so the keywords match no parameter (Swin-Transformer
    #369), and only the Swin encoders added 'mask_token' (SimMIM #26)."""
    names, keywords = OFFICIAL_NO_WEIGHT_DECAY[config.MODEL.TYPE]
    if not is_pretrain:
        return set(names), set(keywords)
    if config.MODEL.TYPE != 'vit':
        names = names | {'mask_token'}
    return {'encoder.' + n for n in names}, {'encoder.' + k for k in keywords}


def skips_weight_decay(name, param, skip_names=(), skip_keywords=()):
    """Whether `param` (called `name`) belongs to a group with weight decay 0."""
    return (param.ndim <= 1 or name.endswith('.bias') or name in skip_names
            or any(keyword in name for keyword in skip_keywords))


def build_param_groups(config, model, is_pretrain=True):
    """The optimizer's parameter groups (see the module docstring for the keys and the rules)."""
    model = unwrap_model(model)
    if config.TRAIN.WEIGHT_DECAY_RULES == 'official':
        skip_names, skip_keywords = official_names_without_weight_decay(config, is_pretrain)
    else:
        skip_names, skip_keywords = _names_without_weight_decay(model)
    scales = layer_lr_scales(config, model) if _uses_layer_decay(config, is_pretrain) else None
    layer_id = LAYER_ID_FUNCTIONS[config.MODEL.TYPE].of_param
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = skips_weight_decay(name, param, skip_names, skip_keywords)
        kind = 'no_decay' if no_decay else 'decay'
        scale = 1.0
        group_name = kind
        if scales is not None:
            scale = scales[name]
            group_name = f'layer_{layer_id(name, config)}_{kind}'
        if group_name not in groups:
            groups[group_name] = {
                'group_name': group_name, 'params': [], 'param_names': [],
                'weight_decay': 0.0 if no_decay else config.TRAIN.WEIGHT_DECAY,
                'lr': config.TRAIN.BASE_LR * scale, 'lr_scale': scale}
        groups[group_name]['params'].append(param)
        groups[group_name]['param_names'].append(name)
    return list(groups.values())


# -----------------------------------------------------------------------------------------------
# Optimizer
# -----------------------------------------------------------------------------------------------


def _fused_kernels_apply(params):
    return all(p.is_floating_point() and p.device.type in ('cpu', 'cuda') for p in params)


def supports_found_inf(optimizer):
    """Whether ``optimizer.step()`` skips the update on device when ``optimizer.found_inf`` holds
    a non-zero tensor (true for the fused AdamW / SGD kernels)."""
    return bool(getattr(optimizer, '_step_supports_amp_scaling', False))


def _log_groups(logger, groups, optimizer):
    logger.info(f"Optimizer {type(optimizer).__name__} with {len(groups)} parameter groups "
                f"(fused={optimizer.defaults.get('fused')}, skips non-finite steps on device: "
                f"{supports_found_inf(optimizer)})")
    for g in groups:
        numel = sum(p.numel() for p in g['params'])
        logger.info(f"  {g['group_name']}: {len(g['params'])} tensors, {numel:,} values, "
                    f"lr_scale {g['lr_scale']:.4g}, lr {g['lr']:.4g}, weight_decay "
                    f"{g['weight_decay']}")
        logger.debug(f"    {g['group_name']} params: {', '.join(g['param_names'])}")


def build_optimizer(config, model, logger=None, is_pretrain=True):
    """The optimizer of TRAIN.OPTIMIZER.NAME over ``build_param_groups(config, model, ...)``."""
    if is_pretrain and config.TRAIN.LAYER_DECAY != 1.0 and logger is not None:
        logger.warning(f"TRAIN.LAYER_DECAY {config.TRAIN.LAYER_DECAY} is ignored in pre-training "
                       f"(as in the official code).")
    groups = build_param_groups(config, model, is_pretrain)
    params = [p for g in groups for p in g['params']]
    if not params:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
    opt = config.TRAIN.OPTIMIZER
    name = opt.NAME.lower()
    fast = {'fused': True} if _fused_kernels_apply(params) else {'foreach': True}
    lr, wd = config.TRAIN.BASE_LR, config.TRAIN.WEIGHT_DECAY
    if name == 'adamw':
        optimizer = torch.optim.AdamW(groups, lr=lr, eps=opt.EPS, betas=tuple(opt.BETAS),
                                      weight_decay=wd, **fast)
    elif name == 'sgd':
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=opt.MOMENTUM, nesterov=True,
                                    weight_decay=wd, **fast)
    elif name == 'lars':
        # MAE's LARS: the trust ratio scales every weight matrix, even with weight decay 0 (the
        # linear-probe recipe), while biases and other 1-D parameters get neither.
        for group in groups:
            group['always_adapt'] = not group['group_name'].endswith('no_decay')
        optimizer = Lars(groups, lr=lr, momentum=opt.MOMENTUM, weight_decay=wd)
    else:
        raise ValueError(f"TRAIN.OPTIMIZER.NAME '{opt.NAME}' is not one of adamw, sgd, lars.")
    if logger is not None:
        _log_groups(logger, groups, optimizer)
    return optimizer
