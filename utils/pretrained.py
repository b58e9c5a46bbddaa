"""Fine-tuning from a SimMIM (or any official-name) checkpoint: MODEL.PRETRAINED -> model.

    load_pretrained(config, model, logger) -> LoadReport
and the pure state-dict steps it runs, in order:
    unwrap_state_dict(obj)                     {'model'|'state_dict'|'module': sd} or a bare sd
    strip_prefixes(sd)                         'module.' / '_orig_mod.'; keep encoder.* and strip it
    remap_swin(sd, model_state)                rpe_mlp -> cpb_mlp, drop index buffers, resize tables
    remap_vit(sd, model_state, patch_grid)     shared -> per-layer RPB, resize tables and pos_embed
    check_compatible(sd, model_state)          raise IncompatibleCheckpointError on a wrong model
(``adapt_state_dict`` runs them all). ``model_state`` is the target model's state dict (only the
names and shapes are read), so every step is testable without building a model.

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
import math
import re
from dataclasses import dataclass, field

from utils.distributed import unwrap_model
from utils.pos_embed import resize_abs_pos_embed, resize_rel_pos_bias_table
from utils.safe_load import load_checkpoint_file

MAX_MISSING_FRACTION = 0.1
REBUILT_BUFFERS = ('relative_position_index', 'relative_coords_table', 'attn_mask')
NEW_IN_FINETUNING = ('head.', 'fc_norm.')  # classifier parts never in a pre-trained encoder
VIT_NUM_EXTRA_TOKENS = 3  # rows of cls->token, token->cls, cls->cls in a ViT RPB table
SHARED_VIT_TABLE = 'rel_pos_bias.relative_position_bias_table'


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint that does not fit the model; the message names keys and shapes."""


@dataclass
class LoadReport:
    """What load_pretrained did: tensors loaded, model keys left at their initial values (rebuilt
    buffers excluded) and checkpoint keys the model does not have."""
    num_loaded: int
    missing_keys: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)


# -----------------------------------------------------------------------------------------------
# Generic steps
# -----------------------------------------------------------------------------------------------


def unwrap_state_dict(obj):
    """The state dict inside a checkpoint object ({'model': sd}, 'state_dict', 'module', or sd)."""
    for key in ('model', 'state_dict', 'module'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(hasattr(v, 'shape') for v in obj.values()):
        raise IncompatibleCheckpointError(
            "The checkpoint holds no state dict: expected {'model': state_dict}, "
            "{'state_dict': ...}, {'module': ...} or a bare {name: tensor} mapping.")
    return dict(obj)


def _strip_leading(key, prefixes=('module.', '_orig_mod.')):
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def strip_prefixes(state_dict):
    """Remove DDP / torch.compile prefixes; if it is a SimMIM checkpoint (keys 'encoder.*'), keep
    the encoder only, without its prefix. mask_token is dropped."""
    sd = {_strip_leading(k): v for k, v in state_dict.items()}
    if any(k.startswith('encoder.') for k in sd):
        sd = {_strip_leading(k[len('encoder.'):]): v for k, v in sd.items()
              if k.startswith('encoder.')}
    sd.pop('mask_token', None)
    return sd


def drop_rebuilt_buffers(state_dict):
    return {k: v for k, v in state_dict.items() if not any(b in k for b in REBUILT_BUFFERS)}


def _resize_pos_embed_key(sd, model_state, key, num_extra_tokens, patch_grid, logger):
    if key not in sd or key not in model_state or sd[key].shape == model_state[key].shape:
        return
    dst_tokens = model_state[key].shape[1] - num_extra_tokens
    if patch_grid is None:
        side = math.isqrt(dst_tokens)
        patch_grid = (side, side)
    same_width = sd[key].shape[-1] == model_state[key].shape[-1]
    if patch_grid[0] * patch_grid[1] != dst_tokens or not same_width:
        return  # left to check_compatible
    old = tuple(sd[key].shape)
    sd[key] = resize_abs_pos_embed(sd[key], patch_grid, num_extra_tokens)
    _log(logger, f"Resized {key} {old} -> {tuple(sd[key].shape)} (bicubic on the patch grid).")


def _resize_tables(sd, model_state, num_extra_tokens, patch_grid, logger):
    resized = {}  # (source shape, target shape) -> keys
    for key in [k for k in sd if k.endswith('relative_position_bias_table')]:
        if key not in model_state or sd[key].shape == model_state[key].shape:
            continue
        src, dst = tuple(sd[key].shape), tuple(model_state[key].shape)
        if src[1] != dst[1]:
            raise IncompatibleCheckpointError(
                f"{key}: the checkpoint has {src[1]} attention heads {src}, the model {dst[1]} "
                f"{dst}. Probably another architecture or size; check MODEL.*.NUM_HEADS.")
        if patch_grid is not None and patch_grid[0] != patch_grid[1]:
            raise NotImplementedError(
                f"{key}: resizing a relative position table {src} -> {dst} for a non-square patch "
                f"grid {tuple(patch_grid)} is not implemented; use a square DATA.IMG_SIZE.")
        dst_side = math.isqrt(dst[0] - num_extra_tokens)
        if dst_side * dst_side != dst[0] - num_extra_tokens:
            raise IncompatibleCheckpointError(
                f"{key}: cannot resize {src} to the model's {dst}, which is not a square grid of "
                f"offsets.")
        sd[key] = resize_rel_pos_bias_table(sd[key], dst_side, num_extra_tokens)
        resized.setdefault((src[0], dst[0]), []).append(key)
    for (src_rows, dst_rows), keys in resized.items():
        _log(logger, f"Resized {len(keys)} relative position tables from {src_rows} to {dst_rows} "
                     f"rows (geometric interpolation): {summarize_keys(keys)}")


# -----------------------------------------------------------------------------------------------
# Architecture-specific remaps
# -----------------------------------------------------------------------------------------------


def rename_released_keys(state_dict):
    """Names of released checkpoints that differ from the code's (SwinV2 rpe_mlp -> cpb_mlp,
    Swin-Transformer issue #271)."""
    return {k.replace('rpe_mlp', 'cpb_mlp'): v for k, v in state_dict.items()}


def remap_swin(state_dict, model_state, patch_grid=None, logger=None):
    """Swin / SwinV2: released SwinV2 names (rpe_mlp -> cpb_mlp), index buffers dropped, relative
    position tables and absolute_pos_embed resized to the model's window / image size."""
    sd = drop_rebuilt_buffers(rename_released_keys(state_dict))
    _resize_tables(sd, model_state, 0, None, logger)
    _resize_pos_embed_key(sd, model_state, 'absolute_pos_embed', 0, patch_grid, logger)
    return sd


def remap_vit(state_dict, model_state, patch_grid=None, logger=None):
    """BEiT-style ViT: a shared relative position table is copied into every block when the model
    has per-block tables; tables and pos_embed are resized to the model's patch grid (h, w)."""
    sd = drop_rebuilt_buffers(dict(state_dict))
    block_tables = sorted((k for k in model_state
                           if re.fullmatch(r'blocks\.\d+\.attn\.relative_position_bias_table', k)),
                          key=lambda k: int(k.split('.')[1]))
    if block_tables and SHARED_VIT_TABLE in sd and SHARED_VIT_TABLE not in model_state:
        shared = sd.pop(SHARED_VIT_TABLE)
        for key in block_tables:
            sd[key] = shared.clone()
        _log(logger, f"Copied the shared {SHARED_VIT_TABLE} into the {len(block_tables)} blocks.")
    _resize_tables(sd, model_state, VIT_NUM_EXTRA_TOKENS, patch_grid, logger)
    _resize_pos_embed_key(sd, model_state, 'pos_embed', 1, patch_grid, logger)
    return sd


REMAPS = {'swin': remap_swin, 'swinv2': remap_swin, 'vit': remap_vit}  # keyed by MODEL.TYPE


def adapt_state_dict(state_dict, model_state, model_type, patch_grid=None, logger=None):
    """A checkpoint's state dict renamed and resized for a model of `model_type` whose state dict
    is `model_state`; mismatched classifier heads are dropped."""
    sd = strip_prefixes(unwrap_state_dict(state_dict))
    sd = REMAPS[model_type](sd, model_state, patch_grid, logger)
    for key in [k for k in sd if k.startswith('head.')]:
        if key in model_state and sd[key].shape != model_state[key].shape:
            _log(logger, f"Not loading {key} {tuple(sd[key].shape)}: the model's head is "
                         f"{tuple(model_state[key].shape)} (another number of classes).")
            del sd[key]
    return sd


# -----------------------------------------------------------------------------------------------
# Checks and reporting
# -----------------------------------------------------------------------------------------------


def _shapes(keys, sd, limit=5):
    return ', '.join(f"{k} {tuple(sd[k].shape)}" for k in keys[:limit])


def check_compatible(state_dict, model_state):
    """Raise IncompatibleCheckpointError if `state_dict` does not fit a model with `model_state`."""
    mismatched = [k for k in state_dict
                  if k in model_state and state_dict[k].shape != model_state[k].shape]
    hint = ("This is probably a checkpoint of another architecture or size; check MODEL.TYPE and "
            "the MODEL.SWIN / SWINV2 / VIT sizes against the pre-training config.")
    if mismatched:
        pairs = '; '.join(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model "
                          f"{tuple(model_state[k].shape)}" for k in mismatched[:5])
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


def summarize_keys(keys, reference_keys=(), limit=12):
    """Keys in plain words: 'fc_norm.*' when every reference key of a top-level module is listed,
    'blocks.*.attn.relative_position_bias_table (x12)' for the same name in numbered blocks."""
    keys = list(keys)
    by_module = {}
    for k in reference_keys:
        by_module.setdefault(k.split('.')[0], set()).add(k)
    parts, counts = [], {}
    for k in keys:
        module = k.split('.')[0]
        if module in by_module and len(by_module[module]) > 1 and by_module[module] <= set(keys):
            pattern = module + '.*'
        else:
            pattern = re.sub(r'\.\d+(?=\.)', '.*', k)
        if pattern not in counts:
            parts.append(pattern)
        counts[pattern] = counts.get(pattern, 0) + 1
    words = [p if counts[p] == 1 or p.endswith('.*') else f"{p} (x{counts[p]})" for p in parts]
    if len(words) > limit:
        words = words[:limit] + [f"... {len(words) - limit} more"]
    return ', '.join(words)


def _log(logger, message):
    if logger is not None:
        logger.info(message)


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


def load_pretrained(config, model, logger=None):
    """Load config.MODEL.PRETRAINED into `model` (strict=False after adapting names and shapes)
    and log what was loaded, what is newly initialised and what was ignored. Returns a
    LoadReport; raises IncompatibleCheckpointError for a checkpoint of another model.
    'timm:NAME_OR_FOLDER' reads a timm model's weights (utils.timm_io) under our names."""
    path = config.MODEL.PRETRAINED
    _log(logger, f"Loading pre-trained weights from {path}")
    model = unwrap_model(model)
    model_state = model.state_dict()
    if path.startswith('timm:'):
        from utils.timm_io import read_timm_checkpoint  # imported here: it imports this module
        checkpoint = read_timm_checkpoint(path[len('timm:'):], config.MODEL.TYPE)
    else:
        checkpoint = load_checkpoint_file(path, 'MODEL.PRETRAINED')
    sd = adapt_state_dict(checkpoint, model_state, config.MODEL.TYPE, _patch_grid(model), logger)
    check_compatible(sd, model_state)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not any(b in k for b in REBUILT_BUFFERS)]
    unexpected = list(result.unexpected_keys)
    report = LoadReport(len(sd) - len(unexpected), missing, unexpected)
    _log(logger, f"Loaded {report.num_loaded} tensors from {path}.")
    if missing:
        _log(logger, f"Newly initialised (not in checkpoint): "
                     f"{summarize_keys(missing, model_state)}")
    if unexpected:
        _log(logger, f"Ignored (not in model): {summarize_keys(unexpected, sd)}")
    return report
