"""Resuming from optimizer states whose parameter groups differ from ours, official ones included.

    load_optimizer_state(optimizer, checkpoint, model, config, logger)
    named_optimizer_state(saved, optimizer, model, config)   (for FSDP's set_state_dict)

An optimizer state names its entries by position (group order, then order inside the group), so it
only loads into an optimizer with the same groups. Ours are built by optimizer.build_param_groups;
the official code's differ:
- pre-training (microsoft/SimMIM and the Swin-Transformer repo's SimMIM): two groups in the
  fixed order [decay, no_decay], with the official no-decay membership
  (optimizer.official_names_without_weight_decay: Swin position tables, SwinV2 logit_scale /
  cpb_mlp and the ViT mask token decayed);
- fine-tuning: one group per 'layer_{id}_{decay|no_decay}' (even with LAYER_DECAY 1), in the
  order their first parameter appears, saved with its 'group_name'.
Here each saved entry is given the name of its parameter, from the groups' own 'param_names'
(our checkpoints) or by rebuilding the official groups for this model, and loaded into our
groups by name. Our group settings (lr, weight decay, betas) are kept: they come from the config.
apex AMP state ('amp', microsoft/SimMIM) is not used; a Swin-Transformer-repo 'scaler' is
loaded by checkpoint.layout when this run uses a GradScaler.
"""

import torch
from timm.utils import unwrap_model

from models.registry import architecture_of
from optimizer import group_parameters, official_names_without_weight_decay
from utils.errors import CheckpointError
from utils.tasks import FINETUNE, PRETRAIN


def official_group_names(config, model, task):
    """The parameter names of each group the official build_optimizer makes for `model`, in the
    official group order: {'decay': names, 'no_decay': names} in pre-training (both, in that
    fixed order), and in fine-tuning {'layer_{id}_{kind}': names} in order of first appearance."""
    skip_names, skip_keywords = official_names_without_weight_decay(config, task)
    parameters = unwrap_model(model).named_parameters()
    if task.masked_image_modeling:
        groups = group_parameters(parameters, skip_names, skip_keywords)
        return {kind: [n for n, _ in groups.get(kind, [])] for kind in ('decay', 'no_decay')}
    arch = architecture_of(config)
    section = arch.section(config)
    groups = group_parameters(
        parameters, skip_names, skip_keywords, lambda name: arch.layer_id(name, section)
    )
    return {group_name: [n for n, _ in members] for group_name, members in groups.items()}


def _saved_names(saved_groups, config, model):
    """Parameter names for each saved group, and where they came from."""
    if all('param_names' in g for g in saved_groups):
        return [list(g['param_names']) for g in saved_groups], 'this framework'
    # The official pre-training groups carry no name; its fine-tuning groups do.
    task = FINETUNE if any('group_name' in g for g in saved_groups) else PRETRAIN
    stage = task.description
    official = official_group_names(config, model, task)
    saved = [(g.get('group_name'), len(g['params'])) for g in saved_groups]
    expected = [
        (None if task.masked_image_modeling else name, len(names))
        for name, names in official.items()
    ]
    if saved != expected:
        raise CheckpointError(
            f"The optimizer state of the resume checkpoint cannot be matched to this model's "
            f'parameters. It has no parameter names, so it was taken for an official {stage} '
            f'state, but its groups (name, size) {saved[:6]} are not the ones the official code '
            f'makes for this model {expected[:6]}. It was written for another model or size: '
            f'check MODEL.TYPE and the MODEL.SWIN / SWINV2 / VIT sizes against its config. To '
            f'start from its weights alone, pass it with --pretrained instead of --resume.'
        )
    return list(official.values()), f'the official {stage} code'


def _as_tensor_step(entry):
    # torch < 1.12 (the official code's era) saved Adam's 'step' as a Python number.
    if 'step' in entry and not torch.is_tensor(entry['step']):
        entry = {**entry, 'step': torch.tensor(float(entry['step']), dtype=torch.float32)}
    return entry


def _state_by_name(saved, names_per_group, optimizer):
    """{parameter name: state entry} of `saved`, checked against the parameters of `optimizer`."""
    by_name = {
        name: _as_tensor_step(saved['state'][index])
        for group, names in zip(saved['param_groups'], names_per_group, strict=True)
        for index, name in zip(group['params'], names, strict=True)
        if index in saved['state']
    }
    ours = [
        (name, param)
        for group in optimizer.param_groups
        for name, param in zip(group['param_names'], group['params'], strict=True)
    ]
    unknown = sorted(set(by_name) - {name for name, _ in ours})
    wrong = [
        (name, tuple(value.shape), tuple(param.shape))
        for name, param in ours
        for value in by_name.get(name, {}).values()
        if torch.is_tensor(value) and value.dim() and value.shape != param.shape
    ]
    if unknown or wrong:
        raise CheckpointError(
            f'The optimizer state of the resume checkpoint does not fit this model: '
            f'{len(unknown)} of its entries name parameters the model lacks {unknown[:3]}, and '
            f'{len(wrong)} have other shapes (name, saved, model) {wrong[:3]}. It was written for '
            f'another model or size; pass it with --pretrained to start from its weights alone.'
        )
    return by_name


def _remapped(saved, names_per_group, optimizer):
    """`saved` re-keyed for `optimizer` by parameter name, with the optimizer's own group
    settings."""
    by_name = _state_by_name(saved, names_per_group, optimizer)
    current = optimizer.state_dict()
    indices = [
        (index, name)
        for group, live in zip(current['param_groups'], optimizer.param_groups, strict=True)
        for index, name in zip(group['params'], live['param_names'], strict=True)
    ]
    state = {index: by_name[name] for index, name in indices if name in by_name}
    return {'state': state, 'param_groups': current['param_groups']}


def load_optimizer_state(optimizer, checkpoint, model, config, logger):
    """Load checkpoint['optimizer'] into `optimizer`: directly when the groups are ours and equal,
    else entry by entry through the parameter names (see the module docstring)."""
    saved = checkpoint['optimizer']
    saved_groups = saved.get('param_groups', [])
    ours = [list(g['param_names']) for g in optimizer.param_groups]
    if [g.get('param_names') for g in saved_groups] == ours:
        optimizer.load_state_dict(saved)
        return
    names_per_group, source = _saved_names(saved_groups, config, model)
    optimizer.load_state_dict(_remapped(saved, names_per_group, optimizer))
    logger.info(
        f'Optimizer state written by {source} with {len(saved_groups)} parameter groups '
        f"loaded into this run's {len(ours)} groups by parameter name; learning rates and "
        f'weight decay come from this config.'
    )
    if 'amp' in checkpoint:
        logger.info(
            "The checkpoint's apex AMP state ('amp': loss scale of microsoft/SimMIM's "
            'fp16 training) is not used: autocast here needs no apex, and an fp16 run '
            'starts a fresh GradScaler.'
        )


def named_optimizer_state(saved, optimizer, model, config):
    """`saved` (torch's numbered optimizer state, ours or official) keyed by parameter name with
    this run's groups, as FSDP's set_state_dict wants it (the sharded counterpart of
    load_optimizer_state)."""
    names_per_group, _ = _saved_names(saved['param_groups'], config, model)
    state = _state_by_name(saved, names_per_group, optimizer)
    groups = [
        {**{k: v for k, v in group.items() if k != 'params'}, 'params': list(group['param_names'])}
        for group in optimizer.param_groups
    ]
    return {'state': state, 'param_groups': groups}
