"""Fine-tuning from a SimMIM (or any official-name) checkpoint: MODEL.PRETRAINED -> model.

    load_pretrained(config, model, logger) -> LoadReport
and the pure state-dict steps it runs, in order:
    unwrap_state_dict(obj)                     {'model'|'state_dict'|'module': sd} or a bare sd
    strip_prefixes(sd)                         'module.' / '_orig_mod.'; keep encoder.* and strip it
                                               (these two in utils/state_dict.py)
    the architecture's remap_checkpoint        e.g. rpe_mlp -> cpb_mlp (Swin), shared -> per-layer
                                               RPB (ViT); drop index buffers, resize tables and
                                               position embeddings (models/architectures.py)
    check_compatible(sd, model_state)          raise IncompatibleCheckpointError on a wrong model
(``adapt_state_dict`` runs them all). ``model_state`` is the target model's state dict (only the
names and shapes are read), so every step is testable without building a model.

``load_full_state_dict(model, checkpoint, source)`` is the strict counterpart for --eval and
--resume: the same names (``canonical_keys``: prefixes, SwinV2 renames, rebuilt buffers), then every
tensor of the model must be in the checkpoint and nothing else, or the error names what is missing
and what is unexpected.

Choices (reference 6.3, with its known bugs fixed):
- ``mask_token`` is dropped (it has no use in fine-tuning); so are the buffers the model rebuilds
  (relative_position_index, relative_coords_table, attn_mask), which are also left out of the
  "missing" report.
- A ViT checkpoint without the shared table loads fine (official issue #19).
- A classifier head (``head.*``) whose shape differs from the model's is not loaded, with a log
  line (fine-tuning a fine-tuned checkpoint on another label set).
- The load fails with IncompatibleCheckpointError, naming keys and shapes, when no tensor
  matches, when a shape cannot be adapted, or when more than MAX_MISSING_FRACTION of the
  backbone's parameter values (head.* and fc_norm.* excluded: those are always new) are not
  in the checkpoint. Those are the signs of another architecture or size.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

from torch import nn
from yacs.config import CfgNode

from models.registry import get_architecture
from utils.distributed import unwrap_model
from utils.errors import IncompatibleCheckpointError
from utils.safe_load import load_checkpoint_file
from utils.state_dict import (REBUILT_BUFFERS, canonical_keys,  # noqa: F401  (re-exported)
                              drop_rebuilt_buffers, log_info, strip_prefixes, summarize_keys,
                              unwrap_state_dict)

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
            log_info(logger, f"Not loading {key} {tuple(sd[key].shape)}: the model's head is "
                             f"{tuple(model_state[key].shape)} (another number of classes).")
            del sd[key]
    return sd


# -----------------------------------------------------------------------------------------------
# Checks and reporting
# -----------------------------------------------------------------------------------------------


def _shapes(keys, sd, limit=5):
    return ', '.join(f"{k} {tuple(sd[k].shape)}" for k in keys[:limit])


def shape_mismatches(state_dict, model_state):
    """(key, checkpoint shape, model shape) of every tensor both have with different shapes."""
    return [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state_dict.items()
            if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)]


def check_compatible(state_dict, model_state):
    """Raise IncompatibleCheckpointError if `state_dict` does not fit a model with `model_state`."""
    mismatched = shape_mismatches(state_dict, model_state)
    hint = ("This is probably a checkpoint of another architecture or size; check MODEL.TYPE and "
            "the MODEL.SWIN / SWINV2 / VIT sizes against the pre-training config.")
    if mismatched:
        pairs = '; '.join(f"{k}: checkpoint {src} vs model {dst}" for k, src, dst in mismatched[:5])
        raise IncompatibleCheckpointError(
            f"{len(mismatched)} checkpoint tensors have shapes the model cannot take: {pairs}. "
            f"{hint}")
    params = [k for k in model_state if not any(b in k for b in REBUILT_BUFFERS)]
    matched = [k for k in params if k in state_dict]
    if not matched:
        raise IncompatibleCheckpointError(
            f"No tensor of the checkpoint matches the model. Checkpoint starts with "
            f"{_shapes(list(state_dict), state_dict)}; the model with "
            f"{_shapes(params, model_state)}. {hint}")
    backbone = [k for k in params if not k.startswith(NEW_IN_FINETUNING)]
    total = sum(model_state[k].numel() for k in backbone)
    missing = [k for k in backbone if k not in state_dict]
    missing_values = sum(model_state[k].numel() for k in missing)
    if total and missing_values > MAX_MISSING_FRACTION * total:
        raise IncompatibleCheckpointError(
            f"{missing_values / total:.0%} of the model's backbone values are not in the "
            f"checkpoint ({len(missing)} tensors, e.g. {_shapes(missing, model_state)}). {hint}")


# -----------------------------------------------------------------------------------------------
# Entry point
# -----------------------------------------------------------------------------------------------


def _patch_grid(model):
    """The model's (h, w) grid of patches, where it says (else square grids are assumed)."""
    for owner, attr in ((model, 'patch_shape'), (model, 'patches_resolution'),
                        (getattr(model, 'patch_embed', None), 'grid_size')):
        grid = getattr(owner, attr, None)
        if grid is not None:
            return tuple(grid)
    return None


def load_pretrained(config: CfgNode, model: nn.Module,
                    logger: Optional[logging.Logger] = None) -> LoadReport:
    """Load config.MODEL.PRETRAINED into `model` (strict=False after adapting names and shapes)
    and log what was loaded, what is newly initialised and what was ignored. Returns a
    LoadReport; raises IncompatibleCheckpointError for a checkpoint of another model.
    'timm:NAME_OR_FOLDER' reads a timm model's weights (checkpoint.timm_folder) under our names."""
    path = config.MODEL.PRETRAINED
    log_info(logger, f"Loading pre-trained weights from {path}")
    model = unwrap_model(model)
    model_state = model.state_dict()
    if path.startswith('timm:'):
        from checkpoint.timm_folder import read_timm_checkpoint  # imported here: it imports this module
        checkpoint = read_timm_checkpoint(path[len('timm:'):], config.MODEL.TYPE)
    else:
        checkpoint = load_checkpoint_file(path, 'MODEL.PRETRAINED')
    sd = adapt_state_dict(checkpoint, model_state, config.MODEL.TYPE, _patch_grid(model), logger)
    check_compatible(sd, model_state)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not any(b in k for b in REBUILT_BUFFERS)]
    unexpected = list(result.unexpected_keys)
    report = LoadReport(len(sd) - len(unexpected), missing, unexpected)
    log_info(logger, f"Loaded {report.num_loaded} tensors from {path}.")
    if missing:
        log_info(logger, f"Newly initialised (not in checkpoint): "
                         f"{summarize_keys(missing, model_state)}")
    if unexpected:
        log_info(logger, f"Ignored (not in model): {summarize_keys(unexpected, sd)}")
    return report


def _looks_pretrained(keys):
    return any(k.startswith('decoder.') or k == 'encoder.mask_token' for k in keys)


def load_full_state_dict(model, checkpoint, source):
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
        raise IncompatibleCheckpointError(f"{source}: {e}") from None
    mismatched = shape_mismatches(sd, model_state)
    if mismatched:
        raise IncompatibleCheckpointError(
            f"{source} does not fit the model (another architecture or size?); first mismatches "
            f"(key, checkpoint shape, model shape): {'; '.join(map(str, mismatched[:5]))}")
    missing = [k for k in model_state if k not in sd]
    unexpected = [k for k in sd if k not in model_state]
    if missing or unexpected:
        if _looks_pretrained(sd) and not _looks_pretrained(model_state):
            hint = ("It is a SimMIM pre-training checkpoint (encoder.* and decoder.* tensors): to "
                    "fine-tune from it pass it with --pretrained (MODEL.PRETRAINED); --eval and "
                    "--resume in main_finetune.py take a checkpoint that fine-tuning wrote "
                    "(model_best.pth or ckpt_epoch_*.pth).")
        else:
            hint = ("Check MODEL.TYPE, the MODEL.SWIN / SWINV2 / VIT sizes and LINEAR_PROBE.ENABLE "
                    "against the config the checkpoint was written with.")
        raise IncompatibleCheckpointError(
            f"{source} does not match the model, so it cannot be used as it is: "
            f"{len(missing)} model tensors are not in it (missing: "
            f"{summarize_keys(missing, model_state, limit=8) or 'none'}) and {len(unexpected)} of "
            f"its tensors are not in the model (unexpected: "
            f"{summarize_keys(unexpected, sd, limit=8) or 'none'}). {hint}")
    model.load_state_dict(sd)
    return len(sd)
