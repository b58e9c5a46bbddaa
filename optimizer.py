"""The optimizer: weight-decay parameter groups, layer-wise LR decay, AdamW / SGD / LARS.

Public entry points:
    build_optimizer(config, model, logger=None, task=PRETRAIN)
    build_param_groups(config, model, task=PRETRAIN)   the groups build_optimizer uses
    layer_lr_scales(config, model)                     {param_name: lr_scale}, for inspection
    supports_found_inf(optimizer)                      whether step() honours `found_inf`
    check_optimizer_config(config)                     TRAIN.OPTIMIZER.NAME is registered
(`task` is a utils.tasks.Task; the official `is_pretrain` flag is accepted in its place.)

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
- Layer-wise LR decay (fine-tuning, TRAIN.LAYER_DECAY != 1) uses the official layer ids (each
  architecture's ``layer_id``, models/architectures.py): scale = LAYER_DECAY ** (L + 1 - layer_id),
  L = number of blocks.
  Each group carries ``lr = BASE_LR * lr_scale`` and ``lr_scale``. The scale is applied exactly
  once: our scheduler (lr_scheduler.py) takes each group's starting lr as its peak and never
  multiplies by 'lr_scale' again (timm >= 0.6 schedulers would, giving scale**2).
- Every group has the keys group_name, params, param_names, weight_decay, lr, lr_scale, in the
  order their first parameter appears in ``model.named_parameters()``; empty groups are omitted.
- AdamW and SGD use the fused kernels whenever every parameter is a floating-point tensor on CPU
  or CUDA (else foreach; SGD also under FSDP, whose sharded parameters fused SGD does not take).
  The fused kernels skip a step on device when the training loop sets
  ``optimizer.found_inf`` to a non-zero tensor, without a host sync; ``supports_found_inf`` says
  whether that is available. LARS (timm, for linear probing) adapts the decay groups (weight
  matrices) whatever the weight decay, and never the no-decay groups, as MAE's LARS.
"""

import logging

import torch
from timm.optim import Lars
from timm.utils import unwrap_model
from torch import nn
from torch.distributed.tensor import DTensor
from yacs.config import CfgNode

from models.registry import architecture_of
from utils.registry import Registry, require_choice
from utils.tasks import PRETRAIN, Task, as_task


def _uses_layer_decay(config, task):
    return task.layer_decay and config.TRAIN.LAYER_DECAY != 1.0


def _layer_id_function(config):
    """(param_name -> layer id, L) of the config's architecture."""
    arch = architecture_of(config)
    section = arch.section(config)
    return (lambda name: arch.layer_id(name, section)), arch.num_layers(section)


def layer_lr_scales(config, model):
    """{param_name: LAYER_DECAY ** (L + 1 - layer_id)} for every trainable parameter."""
    layer_id, num_layers = _layer_id_function(config)
    decay = config.TRAIN.LAYER_DECAY
    return {
        name: decay ** (num_layers + 1 - layer_id(name))
        for name, p in unwrap_model(model).named_parameters()
        if p.requires_grad
    }


# -----------------------------------------------------------------------------------------------
# Parameter groups
# -----------------------------------------------------------------------------------------------


def _names_without_weight_decay(model):
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    keywords = (
        set(model.no_weight_decay_keywords())
        if hasattr(model, 'no_weight_decay_keywords')
        else set()
    )
    return skip, keywords


def official_names_without_weight_decay(config, task):
    """(names, keywords) as the official build_optimizer saw them (the architecture's
    `official_no_weight_decay`). In pre-training the SimMIM wrapper prefixed both with 'encoder.',
    so the keywords match no parameter (Swin-Transformer #369), and only some encoders added
    'mask_token' (SimMIM #26)."""
    names, keywords, encoder_names = architecture_of(config).official_no_weight_decay
    if not task.masked_image_modeling:
        return set(names), set(keywords)
    return (
        {'encoder.' + n for n in set(names) | set(encoder_names)},
        {'encoder.' + k for k in keywords},
    )


def skips_weight_decay(name, param, skip_names=(), skip_keywords=()):
    """Whether `param` (called `name`) belongs to a group with weight decay 0."""
    return (
        param.ndim <= 1
        or name.endswith('.bias')
        or name in skip_names
        or any(keyword in name for keyword in skip_keywords)
    )


def group_parameters(named_parameters, skip_names=(), skip_keywords=(), layer_id=None):
    """{group name: [(name, parameter)]} of the trainable `named_parameters`, in the order each
    group's first parameter appears: 'decay' / 'no_decay', or 'layer_{id}_{decay|no_decay}' when
    `layer_id` (parameter name -> layer id) is given. The grouping of ours and of the official
    code alike (checkpoint/optimizer_state.py rebuilds the official one with it)."""
    groups = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        kind = 'no_decay' if skips_weight_decay(name, param, skip_names, skip_keywords) else 'decay'
        group_name = kind if layer_id is None else f'layer_{layer_id(name)}_{kind}'
        groups.setdefault(group_name, []).append((name, param))
    return groups


def build_param_groups(
    config: CfgNode,
    model: nn.Module,
    task: Task | bool = PRETRAIN,
    *,
    is_pretrain: bool | None = None,
) -> list:
    """The optimizer's parameter groups (see the module docstring for the keys and the rules)."""
    task = as_task(task, is_pretrain)
    model = unwrap_model(model)
    if config.TRAIN.WEIGHT_DECAY_RULES == 'official':
        skip_names, skip_keywords = official_names_without_weight_decay(config, task)
    else:
        skip_names, skip_keywords = _names_without_weight_decay(model)
    layer_id = _layer_id_function(config)[0] if _uses_layer_decay(config, task) else None
    scales = layer_lr_scales(config, model) if layer_id is not None else {}
    groups = []
    for group_name, members in group_parameters(
        model.named_parameters(), skip_names, skip_keywords, layer_id
    ).items():
        scale = scales.get(members[0][0], 1.0)  # one layer per group, so one scale
        groups.append(
            {
                'group_name': group_name,
                'params': [p for _, p in members],
                'param_names': [n for n, _ in members],
                'weight_decay': 0.0
                if group_name.endswith('no_decay')
                else config.TRAIN.WEIGHT_DECAY,
                'lr': config.TRAIN.BASE_LR * scale,
                'lr_scale': scale,
            }
        )
    return groups


# -----------------------------------------------------------------------------------------------
# Optimizer
# -----------------------------------------------------------------------------------------------


# Fused kernels that also take FSDP's sharded parameters (DTensors): torch registers a sharding
# rule for fused Adam/AdamW but not for fused SGD, which then runs as foreach.
_FUSED_ON_DTENSORS = ('adamw',)


def _fused_kernels_apply(params, name):
    if name not in _FUSED_ON_DTENSORS and any(isinstance(p, DTensor) for p in params):
        return False
    return all(p.is_floating_point() and p.device.type in ('cpu', 'cuda') for p in params)


def supports_found_inf(optimizer):
    """Whether ``optimizer.step()`` skips the update on device when ``optimizer.found_inf`` holds
    a non-zero tensor (true for the fused AdamW / SGD kernels)."""
    return bool(getattr(optimizer, '_step_supports_amp_scaling', False))


def _log_groups(logger, groups, optimizer):
    logger.info(
        f'Optimizer {type(optimizer).__name__} with {len(groups)} parameter groups '
        f'(fused={optimizer.defaults.get("fused")}, skips non-finite steps on device: '
        f'{supports_found_inf(optimizer)})'
    )
    for g in groups:
        numel = sum(p.numel() for p in g['params'])
        logger.info(
            f'  {g["group_name"]}: {len(g["params"])} tensors, {numel:,} values, '
            f'lr_scale {g["lr_scale"]:.4g}, lr {g["lr"]:.4g}, weight_decay '
            f'{g["weight_decay"]}'
        )
        logger.debug(f'    {g["group_name"]} params: {", ".join(g["param_names"])}')


def _adamw(groups, config, fast):
    opt = config.TRAIN.OPTIMIZER
    return torch.optim.AdamW(
        groups,
        lr=config.TRAIN.BASE_LR,
        eps=opt.EPS,
        betas=tuple(opt.BETAS),
        weight_decay=config.TRAIN.WEIGHT_DECAY,
        **fast,
    )


def _sgd(groups, config, fast):
    return torch.optim.SGD(
        groups,
        lr=config.TRAIN.BASE_LR,
        momentum=config.TRAIN.OPTIMIZER.MOMENTUM,
        nesterov=True,
        weight_decay=config.TRAIN.WEIGHT_DECAY,
        **fast,
    )


def _lars(groups, config, fast):
    # MAE's LARS: the trust ratio scales every weight matrix, even with weight decay 0 (the
    # linear-probe recipe), while biases and other 1-D parameters get neither.
    for group in groups:
        group['always_adapt'] = not group['group_name'].endswith('no_decay')
    return Lars(
        groups,
        lr=config.TRAIN.BASE_LR,
        momentum=config.TRAIN.OPTIMIZER.MOMENTUM,
        weight_decay=config.TRAIN.WEIGHT_DECAY,
    )


WEIGHT_DECAY_RULES = ('ours', 'official')  # TRAIN.WEIGHT_DECAY_RULES (module docstring)
# TRAIN.OPTIMIZER.NAME -> (param groups, config, {'fused' or 'foreach': True}) -> optimizer
OPTIMIZERS = Registry(
    'TRAIN.OPTIMIZER.NAME', 'optimizers', {'adamw': _adamw, 'sgd': _sgd, 'lars': _lars}
)


def check_optimizer_config(config):
    OPTIMIZERS.lookup(config.TRAIN.OPTIMIZER.NAME)
    require_choice(
        'TRAIN.WEIGHT_DECAY_RULES', config.TRAIN.WEIGHT_DECAY_RULES, WEIGHT_DECAY_RULES, 'rules'
    )


def build_optimizer(
    config: CfgNode,
    model: nn.Module,
    logger: logging.Logger | None = None,
    task: Task | bool = PRETRAIN,
    *,
    is_pretrain: bool | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of TRAIN.OPTIMIZER.NAME over ``build_param_groups(config, model, task)``."""
    task = as_task(task, is_pretrain)
    if not task.layer_decay and config.TRAIN.LAYER_DECAY != 1.0 and logger is not None:
        logger.warning(
            f'TRAIN.LAYER_DECAY {config.TRAIN.LAYER_DECAY} is ignored in '
            f'{task.description} (as in the official code).'
        )
    check_optimizer_config(config)
    groups = build_param_groups(config, model, task)
    params = [p for g in groups for p in g['params']]
    if not params:
        raise ValueError('The model has no trainable parameters (all have requires_grad=False).')
    name = config.TRAIN.OPTIMIZER.NAME
    fast = {'fused': True} if _fused_kernels_apply(params, name) else {'foreach': True}
    optimizer = OPTIMIZERS[name](groups, config, fast)
    if logger is not None:
        _log_groups(logger, groups, optimizer)
    return optimizer
