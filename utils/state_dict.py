"""Generic steps for adapting a checkpoint's state dict to a model, shared by every architecture's
checkpoint remap (models/architectures.py) and by load_pretrained (checkpoint/weights.py).

    drop_rebuilt_buffers(sd)                          index / mask buffers the models rebuild
    canonical_keys(sd)                                no DDP/compile prefix, released names renamed
    unwrap_state_dict(obj), strip_prefixes(sd)        the state dict in a checkpoint; its encoder
    resize_position_tables(sd, model_state, ...)      relative-position tables to the model's window
    resize_pos_embed_entry(sd, model_state, key, ...) an absolute position embedding to its grid
    summarize_keys(keys, reference_keys)              keys in plain words, for log lines
    check_fits(stored, model_state, source)           the one report of missing, unexpected and
                                                      mis-shaped keys, raised when any differ
    encoder_weights(checkpoint), num_classes_of(sd)   an encoder's weights; a classifier's classes

`model_state` is the target model's state dict (only names and shapes are read).
"""

import math
import re

import torch

from utils.errors import CheckpointError, IncompatibleCheckpointError
from utils.pos_embed import resize_abs_pos_embed, resize_rel_pos_bias_table

REBUILT_BUFFERS = ('relative_position_index', 'relative_coords_table', 'attn_mask')


def log_info(logger, message):
    if logger is not None:
        logger.info(message)


def drop_rebuilt_buffers(state_dict):
    """`state_dict` without the buffers the models rebuild from the config."""
    return {k: v for k, v in state_dict.items() if not any(b in k for b in REBUILT_BUFFERS)}


def strip_wrapper_prefixes(key, prefixes=('module.', '_orig_mod.')):
    """`key` without leading DDP ('module.') and torch.compile ('_orig_mod.') prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def rename_released_keys(state_dict):
    """Names of the released SwinV2 files (rpe_mlp) as the code spells them (cpb_mlp;
    Swin-Transformer #271)."""
    return {key.replace('rpe_mlp', 'cpb_mlp'): value for key, value in state_dict.items()}


def canonical_keys(state_dict):
    """The names our models use, for a state dict of this framework or the official code: no DDP /
    torch.compile prefix, released SwinV2 names renamed, rebuilt buffers dropped ('encoder.'
    kept)."""
    return drop_rebuilt_buffers(
        rename_released_keys({strip_wrapper_prefixes(k): v for k, v in state_dict.items()})
    )


def resize_pos_embed_entry(sd, model_state, key, num_extra_tokens, patch_grid, logger=None):
    """Resize sd[key], an absolute position embedding with `num_extra_tokens` leading tokens, to the
    model's patch grid (h, w) (square when None), in place; left alone when it cannot fit."""
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
    log_info(logger, f'Resized {key} {old} -> {tuple(sd[key].shape)} (bicubic on the patch grid).')


def resize_position_tables(sd, model_state, num_extra_tokens, patch_grid=None, logger=None):
    """Resize every relative_position_bias_table of `sd` whose shape differs from the model's, in
    place (geometric interpolation; `num_extra_tokens` rows at the end are kept)."""
    resized = {}  # (source shape, target shape) -> keys
    for key in [k for k in sd if k.endswith('relative_position_bias_table')]:
        if key not in model_state or sd[key].shape == model_state[key].shape:
            continue
        src, dst = tuple(sd[key].shape), tuple(model_state[key].shape)
        if src[1] != dst[1]:
            raise IncompatibleCheckpointError(
                f'{key}: the checkpoint has {src[1]} attention heads {src}, the model {dst[1]} '
                f'{dst}. Probably another architecture or size; check MODEL.*.NUM_HEADS.'
            )
        if patch_grid is not None and patch_grid[0] != patch_grid[1]:
            raise NotImplementedError(
                f'{key}: resizing a relative position table {src} -> {dst} for a non-square patch '
                f'grid {tuple(patch_grid)} is not implemented; use a square DATA.IMG_SIZE.'
            )
        dst_side = math.isqrt(dst[0] - num_extra_tokens)
        if dst_side * dst_side != dst[0] - num_extra_tokens:
            raise IncompatibleCheckpointError(
                f"{key}: cannot resize {src} to the model's {dst}, which is not a square grid of "
                f'offsets.'
            )
        sd[key] = resize_rel_pos_bias_table(sd[key], dst_side, num_extra_tokens)
        resized.setdefault((src[0], dst[0]), []).append(key)
    for (src_rows, dst_rows), keys in resized.items():
        log_info(
            logger,
            f'Resized {len(keys)} relative position tables from {src_rows} to '
            f'{dst_rows} rows (geometric interpolation): {summarize_keys(keys)}',
        )


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
    words = [p if counts[p] == 1 or p.endswith('.*') else f'{p} (x{counts[p]})' for p in parts]
    if len(words) > limit:
        words = words[:limit] + [f'... {len(words) - limit} more']
    return ', '.join(words)


def unwrap_state_dict(obj):
    """The state dict inside a checkpoint object ({'model': sd}, 'state_dict', 'module', or sd)."""
    for key in ('model', 'state_dict', 'module'):
        if isinstance(obj, dict) and key in obj:
            if not isinstance(obj[key], dict):
                raise IncompatibleCheckpointError(
                    f"The checkpoint's '{key}' entry is a {type(obj[key]).__name__}, not a state "
                    f"dict ({{parameter name: tensor}}); it was not saved from a model's "
                    f"state_dict(). Re-save it with torch.save({{'{key}': model.state_dict()}}, "
                    f'path).'
                )
            obj = obj[key]
            break
    if (
        not isinstance(obj, dict)
        or not all(isinstance(k, str) for k in obj)
        or not all(hasattr(v, 'shape') for v in obj.values())
    ):
        raise IncompatibleCheckpointError(
            "The checkpoint holds no state dict: expected {'model': state_dict}, "
            "{'state_dict': ...}, {'module': ...} or a bare {name: tensor} mapping."
        )
    return dict(obj)


def strip_prefixes(state_dict):
    """Remove DDP / torch.compile prefixes; if it is a SimMIM checkpoint (keys 'encoder.*'), keep
    the encoder only, without its prefix. mask_token is dropped."""
    sd = {strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    if any(k.startswith('encoder.') for k in sd):
        sd = {
            strip_wrapper_prefixes(k[len('encoder.') :]): v
            for k, v in sd.items()
            if k.startswith('encoder.')
        }
    sd.pop('mask_token', None)
    return sd


# -----------------------------------------------------------------------------------------------
# A state dict against a model
# -----------------------------------------------------------------------------------------------
def _shape(value):
    return tuple(getattr(value, 'shape', value))


def key_differences(stored, model_state):
    """(missing, unexpected, mismatched) between `stored` ({name: tensor or shape}) and the
    model's state dict: model keys it lacks, its keys the model lacks, and (key, stored shape,
    model shape) of the keys both have with different shapes."""
    missing = [k for k in model_state if k not in stored]
    unexpected = [k for k in stored if k not in model_state]
    mismatched = [
        (k, _shape(stored[k]), _shape(v))
        for k, v in model_state.items()
        if k in stored and _shape(stored[k]) != _shape(v)
    ]
    return missing, unexpected, mismatched


def describe_key_differences(missing, unexpected, mismatched, stored=(), model_state=(), limit=8):
    """The differences `key_differences` found, in plain words (keys grouped by summarize_keys)."""
    parts = []
    if missing:
        parts.append(
            f'{len(missing)} model tensors are not in it (missing: '
            f'{summarize_keys(missing, model_state, limit)})'
        )
    if unexpected:
        parts.append(
            f'{len(unexpected)} of its tensors are not in the model (unexpected: '
            f'{summarize_keys(unexpected, stored, limit)})'
        )
    if mismatched:
        pairs = '; '.join(f'{k}: checkpoint {src} vs model {dst}' for k, src, dst in mismatched[:5])
        parts.append(f'{len(mismatched)} shape mismatches ({pairs})')
    return '; '.join(parts)


def check_fits(stored, model_state, source, hint='', model_name='the model'):
    """Raise IncompatibleCheckpointError naming every difference unless `stored` ({name: tensor or
    shape}) has exactly the keys and shapes of `model_state`; `source` names the checkpoint."""
    missing, unexpected, mismatched = key_differences(stored, model_state)
    if missing or unexpected or mismatched:
        report = describe_key_differences(missing, unexpected, mismatched, stored, model_state)
        raise IncompatibleCheckpointError(
            f'{source} does not fit {model_name} (another architecture or size?): {report}.'
            f'{" " + hint if hint else ""}'
        )


def encoder_weights(checkpoint):
    """(state dict of the encoder or classifier under our names, names of what was left out).

    A SimMIM checkpoint's `encoder.` prefix is removed and its decoder and mask token are left
    out (both exist only for pre-training); so is a linear probe's head. DDP / torch.compile
    prefixes, buffers the model rebuilds and released SwinV2 names are normalised."""
    full = drop_rebuilt_buffers(unwrap_state_dict(checkpoint))
    weights = rename_released_keys(strip_prefixes(full))
    dropped = [
        k
        for k in full
        if re.sub(r'^((module|_orig_mod)\.)*(encoder\.)?', '', k).replace('rpe_mlp', 'cpb_mlp')
        not in weights
    ]
    return weights, dropped


def num_classes_of(state_dict):
    """Outputs of the classifier head in `state_dict`; 0 for an encoder without one."""
    head = state_dict.get('head.weight')
    return int(head.shape[0]) if head is not None else 0


def nonfinite_tensors(tree, prefix=''):
    """Names (dotted paths) of the floating-point tensors in `tree` (nested dicts, lists and
    tuples of tensors) holding a NaN or an infinity. A finite sum (one fast pass) proves every value
    finite; only a sum that is not (an overflow, or a real NaN) is checked value by value."""
    if torch.is_tensor(tree):
        bad = tree.is_floating_point() and tree.numel() and not torch.isfinite(tree.sum())
        bad = bad and not torch.isfinite(tree).all()
        return [prefix.rstrip('.') or '(tensor)'] if bad else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    return [name for key, value in items for name in nonfinite_tensors(value, f'{prefix}{key}.')]


def check_finite(tree, source):
    """Raise CheckpointError naming the tensors of `tree` that hold NaN or Inf; `source` names
    what they were read from."""
    bad = nonfinite_tensors(tree)
    if bad:
        raise CheckpointError(
            f'{source} holds NaN or infinite values in {len(bad)} tensors '
            f'({summarize_keys(bad, limit=6)}). Such weights make every training step non-finite '
            f'and every output meaningless: the run that wrote them diverged, or the file is '
            f'damaged. Use an earlier checkpoint.'
        )
