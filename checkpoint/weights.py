"""Model weights from a checkpoint into a model: adapted for fine-tuning (MODEL.PRETRAINED), or
strict for --eval and --resume.

    load_pretrained(config, model, logger) -> LoadReport   names and shapes adapted, then loaded
    adapt_state_dict(sd, model_state, model_type, ...)     the adaptation alone (architecture's
                                                           remap_checkpoint: renames, resizes)
    check_compatible(sd, model_state)                      the signs of another architecture
    load_full_state_dict(model, checkpoint, source)        every tensor from the file, or an error

``model_state`` is the target model's state dict (only names and shapes are read), so every step
is testable without building a model. What is dropped, resized or refused, and why (the official
load_pretrained with its known bugs fixed): docs/finetuning.md.
"""

import logging
from dataclasses import dataclass, field

from timm.utils import unwrap_model
from torch import nn
from yacs.config import CfgNode

from checkpoint.hf_folder import read_hf_checkpoint
from checkpoint.timm_folder import read_timm_checkpoint
from models.registry import get_architecture
from utils.errors import IncompatibleCheckpointError
from utils.safe_load import load_checkpoint_file
from utils.state_dict import (
    REBUILT_BUFFERS,
    canonical_keys,
    check_finite,
    check_fits,
    describe_key_differences,
    key_differences,
    log_info,
    strip_prefixes,
    summarize_keys,
    unwrap_state_dict,
)

MAX_MISSING_FRACTION = 0.1
NEW_IN_FINETUNING = ('head.', 'fc_norm.')  # classifier parts never in a pre-trained encoder


@dataclass
class LoadReport:
    """What load_pretrained did: tensors loaded, model keys left at their initial values (rebuilt
    buffers excluded) and checkpoint keys the model does not have."""

    num_loaded: int
    missing_keys: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)


# -----------------------------------------------------------------------------------------------
# Adapting a state dict
# -----------------------------------------------------------------------------------------------


def adapt_state_dict(state_dict, model_state, model_type, patch_grid=None, logger=None):
    """A checkpoint's state dict renamed and resized for a model of `model_type` whose state dict
    is `model_state`; mismatched classifier heads are dropped."""
    sd = strip_prefixes(unwrap_state_dict(state_dict))
    sd = get_architecture(model_type).remap_checkpoint(sd, model_state, patch_grid, logger)
    for key in [k for k in sd if k.startswith('head.')]:
        if key in model_state and sd[key].shape != model_state[key].shape:
            log_info(
                logger,
                f"Not loading {key} {tuple(sd[key].shape)}: the model's head is "
                f'{tuple(model_state[key].shape)} (another number of classes).',
            )
            del sd[key]
    return sd


# -----------------------------------------------------------------------------------------------
# Checks and reporting
# -----------------------------------------------------------------------------------------------


def _shapes(keys, sd, limit=5):
    return ', '.join(f'{k} {tuple(sd[k].shape)}' for k in keys[:limit])


def check_compatible(state_dict, model_state):
    """Raise IncompatibleCheckpointError if `state_dict` does not fit a model with `model_state`."""
    mismatched = key_differences(state_dict, model_state)[2]
    hint = (
        'This is probably a checkpoint of another architecture or size; check MODEL.TYPE and '
        'the MODEL.SWIN / SWINV2 / VIT sizes against the pre-training config.'
    )
    if mismatched:
        raise IncompatibleCheckpointError(
            f'The checkpoint does not fit the model: '
            f'{describe_key_differences([], [], mismatched)}. {hint}'
        )
    params = [k for k in model_state if not any(b in k for b in REBUILT_BUFFERS)]
    matched = [k for k in params if k in state_dict]
    if not matched:
        raise IncompatibleCheckpointError(
            f'No tensor of the checkpoint matches the model. Checkpoint starts with '
            f'{_shapes(list(state_dict), state_dict)}; the model with '
            f'{_shapes(params, model_state)}. {hint}'
        )
    backbone = [k for k in params if not k.startswith(NEW_IN_FINETUNING)]
    total = sum(model_state[k].numel() for k in backbone)
    missing = [k for k in backbone if k not in state_dict]
    missing_values = sum(model_state[k].numel() for k in missing)
    if total and missing_values > MAX_MISSING_FRACTION * total:
        raise IncompatibleCheckpointError(
            f"{missing_values / total:.0%} of the model's backbone values are not in the "
            f'checkpoint ({len(missing)} tensors, e.g. {_shapes(missing, model_state)}). {hint}'
        )


# -----------------------------------------------------------------------------------------------
# Entry point
# -----------------------------------------------------------------------------------------------


def _patch_grid(model):
    """The model's (h, w) grid of patches, where it says (else square grids are assumed)."""
    for owner, attr in (
        (model, 'patch_shape'),
        (model, 'patches_resolution'),
        (getattr(model, 'patch_embed', None), 'grid_size'),
    ):
        grid = getattr(owner, attr, None)
        if grid is not None:
            return tuple(grid)
    return None


def load_pretrained(
    config: CfgNode, model: nn.Module, logger: logging.Logger | None = None
) -> LoadReport:
    """Load config.MODEL.PRETRAINED into `model` (strict=False after adapting names and shapes)
    and log what was loaded, what is newly initialised and what was ignored. Returns a
    LoadReport; raises IncompatibleCheckpointError for a checkpoint of another model.
    'timm:NAME_OR_FOLDER' reads a timm model's weights (checkpoint.timm_folder) under our names,
    'hf:FOLDER' a transformers Swin / SwinV2 folder's (checkpoint.hf_folder)."""
    path = config.MODEL.PRETRAINED
    log_info(logger, f'Loading pre-trained weights from {path}')
    model = unwrap_model(model)
    model_state = model.state_dict()
    if path.startswith('timm:'):
        checkpoint = read_timm_checkpoint(path[len('timm:') :], config.MODEL.TYPE)
    elif path.startswith('hf:'):
        checkpoint = read_hf_checkpoint(path[len('hf:') :], config.MODEL.TYPE)
    else:
        checkpoint = load_checkpoint_file(path, 'MODEL.PRETRAINED')
    sd = adapt_state_dict(checkpoint, model_state, config.MODEL.TYPE, _patch_grid(model), logger)
    check_compatible(sd, model_state)
    check_finite(sd, f'MODEL.PRETRAINED {path}')
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not any(b in k for b in REBUILT_BUFFERS)]
    unexpected = list(result.unexpected_keys)
    report = LoadReport(len(sd) - len(unexpected), missing, unexpected)
    log_info(logger, f'Loaded {report.num_loaded} tensors from {path}.')
    if missing:
        log_info(
            logger, f'Newly initialised (not in checkpoint): {summarize_keys(missing, model_state)}'
        )
    if unexpected:
        log_info(logger, f'Ignored (not in model): {summarize_keys(unexpected, sd)}')
    return report


def _looks_pretrained(keys):
    return any(k.startswith('decoder.') or k == 'encoder.mask_token' for k in keys)


def load_full_state_dict(model: nn.Module, checkpoint: dict, source: str) -> int:
    """Load `checkpoint` (a checkpoint dict or a bare state dict) into `model` for --eval or
    --resume, where every tensor must come from the file. Names go through ``canonical_keys``; a
    wrong shape, a model tensor the file lacks or a file tensor the model lacks raises
    IncompatibleCheckpointError naming them, before anything is loaded. `source` names the file in
    the message (e.g. '--resume checkpoint /path')."""
    model = unwrap_model(model)
    model_state = model.state_dict()  # rebuilt buffers are not persistent, so not in here
    try:
        sd = canonical_keys(unwrap_state_dict(checkpoint))
    except IncompatibleCheckpointError as e:
        raise IncompatibleCheckpointError(f'{source}: {e}') from None
    if _looks_pretrained(sd) and not _looks_pretrained(model_state):
        hint = (
            'It is a SimMIM pre-training checkpoint (encoder.* and decoder.* tensors): to '
            'fine-tune from it pass it with --pretrained (MODEL.PRETRAINED); --eval and '
            '--resume in main_finetune.py take a checkpoint that fine-tuning wrote '
            '(model_best.pth or ckpt_epoch_*.pth).'
        )
    else:
        hint = (
            'Check MODEL.TYPE, the MODEL.SWIN / SWINV2 / VIT sizes and LINEAR_PROBE.ENABLE '
            'against the config the checkpoint was written with.'
        )
    check_fits(sd, model_state, source, hint)
    check_finite(sd, source)
    model.load_state_dict(sd)
    return len(sd)
