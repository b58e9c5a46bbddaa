"""Sharded checkpoints (TRAIN.SHARDING fsdp): one directory per checkpoint (``.metadata`` and
``__{rank}_0.distcp`` from torch.distributed.checkpoint, ``progress.pth`` with the rest, a
``COMPLETE`` marker written last), each rank writing its own shards, readable again on any number
of ranks (`load_distributed_state`, for either layout) or whole (`read_sharded_checkpoint`,
`read_checkpoint`). DCP's pickled metadata is read through an allow-list; nothing runs code. The
layout and its guarantees: docs/scaling.md.
"""

import contextlib
import json
import logging
import os
import pickle
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from checkpoint.layout import REQUIRED_KEYS
from checkpoint.optimizer_state import named_optimizer_state
from utils.atomic_write import atomic_save, fsync_folder, write_error
from utils.checksum import check_file, file_record
from utils.distributed import agree_on_failure, all_gather_objects, barrier, local_tensor
from utils.errors import CheckpointError, CheckpointWriteError
from utils.json_file import read_json
from utils.safe_load import SHARDED_MARKER as MARKER
from utils.safe_load import folder_error, load_checkpoint_file
from utils.state_dict import canonical_keys, check_finite, check_fits

logger = logging.getLogger('simmim.checkpoint')
PROGRESS_FILE = 'progress.pth'
_OPTIMIZER_KEYS = ('optimizer_param_groups', 'optimizer_extra_state')


@contextlib.contextmanager
def _quiet_without_process_group():
    """DCP warns on every call without a process group that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'torch\.distributed is (disabled, )?unavailable')
        yield


def is_sharded_checkpoint(path):
    return os.path.isdir(path)


# -----------------------------------------------------------------------------------------------
# Reading DCP metadata without running pickled code
# -----------------------------------------------------------------------------------------------
_METADATA_CLASSES = {
    ('torch.distributed.checkpoint.metadata', name)
    for name in (
        'Metadata',
        'TensorStorageMetadata',
        'TensorProperties',
        'ChunkStorageMetadata',
        'MetadataIndex',
        'StorageMeta',
        '_MEM_FORMAT_ENCODING',
    )
} | {
    ('torch.distributed.checkpoint.filesystem', '_StorageInfo'),
    ('torch', 'Size'),
    ('torch.serialization', '_get_layout'),
    ('collections', 'OrderedDict'),
    ('pathlib', 'PosixPath'),
    ('pathlib', 'PurePosixPath'),
    ('pathlib', 'WindowsPath'),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes and torch dtypes, nothing else (not even DCP's pickled
    non-tensor items, which our checkpoints never hold)."""

    def find_class(self, module, name):
        is_dtype = module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'{module}.{name}')


def read_metadata(path):
    """The DCP Metadata of the checkpoint directory `path`, read through the allow-list."""
    file = os.path.join(path, '.metadata')
    try:
        with open(file, 'rb') as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'Refused to load {path}: its .metadata holds a pickled {e}, which is not part of a '
            f'checkpoint written by this framework, so loading it could run arbitrary code.'
        ) from None
    except (OSError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(
            f'{file} is not readable DCP metadata ({type(e).__name__}: {e}). '
            f'Use an earlier checkpoint.'
        ) from None


def _stored_tensors(metadata, top_key):
    """{name: shape} of the tensors stored under `top_key` ('model' or 'optimizer_state')."""
    return {
        '.'.join(path[1:]): tuple(metadata.state_dict_metadata[flat].size)
        for flat, path in metadata.planner_data.items()
        if path[0] == top_key
    }


# -----------------------------------------------------------------------------------------------
# The optimizer state: parameters by name (DCP) vs numbered (torch's optimizer.state_dict())
# -----------------------------------------------------------------------------------------------
def optimizer_state_by_name(state_dict):
    """torch's `optimizer.state_dict()` (parameters numbered) keyed by parameter names instead, as
    `set_state_dict` wants; uses the 'param_names' our parameter groups carry (optimizer.py)."""
    names, groups = {}, []
    for group in state_dict['param_groups']:
        names.update(zip(group['params'], group['param_names'], strict=True))
        groups.append({**group, 'params': list(group['param_names'])})
    return {'state': {names[i]: s for i, s in state_dict['state'].items()}, 'param_groups': groups}


def optimizer_state_by_index(state_dict):
    """The inverse of `optimizer_state_by_name`: torch's own numbered layout."""
    index, groups = {}, []
    for group in state_dict['param_groups']:
        groups.append(
            {**group, 'params': [index.setdefault(n, len(index)) for n in group['params']]}
        )
    return {'state': {index[n]: s for n, s in state_dict['state'].items()}, 'param_groups': groups}


def _split_tensors(state):
    """{name: {key: value}} -> (tensor values, other values), two trees of that shape: DCP gets
    the tensors, progress.pth the rest (e.g. a None momentum buffer)."""
    tensors = {n: {k: v for k, v in s.items() if torch.is_tensor(v)} for n, s in state.items()}
    others = {n: {k: v for k, v in s.items() if not torch.is_tensor(v)} for n, s in state.items()}
    return tensors, others


def _merge_state(tensors, others):
    return {n: {**tensors.get(n, {}), **others.get(n, {})} for n in {**tensors, **others}}


# -----------------------------------------------------------------------------------------------
# Writing
# -----------------------------------------------------------------------------------------------
def _write_marker(folder, world_size, files):
    marker = {'layout': 'torch.distributed.checkpoint', 'world_size': world_size, 'files': files}
    with open(os.path.join(folder, MARKER), 'w') as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())


def _own_shard_records(folder, rank):
    """Checksum records of the shard files rank `rank` wrote into `folder`."""
    return {
        name: file_record(os.path.join(folder, name))
        for name in os.listdir(folder)
        if name.startswith(f'__{rank}_') and name.endswith('.distcp')
    }


def _publish(tmp, path, world_size, files):
    """Marker last (with the checksum record of every file), then rename `tmp` to `path` (a
    directory of that name is replaced)."""
    for name in ('.metadata', PROGRESS_FILE):
        files[name] = file_record(os.path.join(tmp, name))
    _write_marker(tmp, world_size, files)
    old = f'{path}.old'
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def _write_error(path, error):
    if isinstance(error, CheckpointWriteError):
        return error
    failures = getattr(error, 'failures', None) or {}  # DCP's CheckpointException: per rank
    causes = [error] + [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return write_error(path, causes, 'the sharded checkpoint', 'a larger disk shared by all nodes')


def save_sharded_checkpoint(path, model, optimizer, progress, dist_info):
    """Write `model`, `optimizer` and `progress` (checkpoint.layout.progress_state) as the sharded
    directory `path`. Collective: every rank calls it with the same path, on a file system all
    ranks share. A failure on any rank raises CheckpointWriteError on every rank and leaves the
    earlier checkpoints as they were."""
    tmp = f'{path}.tmp'
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write; DCP creates it anew
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors, others = _split_tensors(optimizer_state['state'])
    error, records = None, {}
    try:
        with _quiet_without_process_group():  # raises on every rank if any rank failed
            dcp.save(
                {'model': model_state, 'optimizer_state': tensors},
                storage_writer=FileSystemWriter(tmp),
            )
        records = _own_shard_records(tmp, dist_info.rank)  # each rank hashes what it wrote
    except Exception as e:  # every rank learns of it below
        error = _write_error(path, e)
    _agree_or_clean_up(error, tmp, dist_info)
    files = {
        name: r for rank_records in all_gather_objects(records) for name, r in rank_records.items()
    }
    if dist_info.is_main:
        try:
            atomic_save(
                {
                    **progress,
                    'optimizer_param_groups': optimizer_state['param_groups'],
                    'optimizer_extra_state': others,
                },
                os.path.join(tmp, PROGRESS_FILE),
            )
            _publish(tmp, path, dist_info.world_size, files)
        except Exception as e:  # every rank learns of it below
            error = _write_error(path, e)
    _agree_or_clean_up(error, tmp, dist_info)
    barrier()


def _agree_or_clean_up(error, tmp, dist_info):
    """Raise on every rank if any rank failed, after rank 0 removed the unfinished `tmp`."""
    try:
        agree_on_failure(error)
    except Exception:
        if dist_info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# -----------------------------------------------------------------------------------------------
# Finding, verifying, resuming
# -----------------------------------------------------------------------------------------------
def read_marker(path):
    """The COMPLETE marker of the sharded directory `path` (a folder error when there is none)."""
    marker_file = os.path.join(path, MARKER)
    if not os.path.isfile(marker_file):  # interrupted, or no sharded checkpoint
        raise folder_error(path, 'resume checkpoint')
    marker = read_json(
        marker_file,
        CheckpointError,
        f'The sharded checkpoint {path} cannot be verified without it; use an earlier checkpoint.',
    )
    return marker if isinstance(marker, dict) else {}


def check_shard_files(path, marker):
    """Check every file of the sharded directory `path` against the records of its `marker`;
    a directory without records (written before they were kept) is logged as unverified."""
    files = marker.get('files')
    if not files:
        logger.info(
            f'{path}: no checksums recorded (an older sharded checkpoint), so its files '
            f'are not verified'
        )
        return
    for name, record in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(
                f'The sharded checkpoint {path} lacks {name}, which it was written with. Use an '
                f'earlier checkpoint, or copy the whole directory again.'
            )
        check_file(file, record, 'A file of the sharded checkpoint')


def verify_sharded_checkpoint(path, check_bytes=True):
    """Check that the directory `path` is a complete sharded checkpoint (with `check_bytes`: every
    file against its checksum); return the dict of progress.pth (the single-file checkpoint's
    keys but 'model' and 'optimizer') or raise."""
    marker = read_marker(path)
    progress = load_checkpoint_file(os.path.join(path, PROGRESS_FILE), 'resume checkpoint', None)
    missing = [k for k in (*REQUIRED_KEYS[2:], *_OPTIMIZER_KEYS) if k not in progress]
    if missing:
        raise CheckpointError(f'{path}/{PROGRESS_FILE} lacks {", ".join(missing)}.')
    read_metadata(path)  # through the allow-list first: a foreign pickle is refused as such
    if check_bytes:
        check_shard_files(path, marker)
    return progress


def load_distributed_state(path, checkpoint, state, config=None, logger=None):
    """Load the model and optimizer of `state` (a TrainingState; the model FSDP-sharded or whole)
    from either layout on any number of ranks, through DCP's set_state_dict; `checkpoint` is what
    verifying `path` returned. A single file of the official code (optimizer groups without
    parameter names) needs the run's `config` to name them. The rest of the checkpoint is restored
    by checkpoint.resume."""
    model, optimizer = state.model, state.optimizer
    model_state, optimizer_state = get_state_dict(model, optimizer)  # this run's shards
    if is_sharded_checkpoint(path):
        check_fits(
            _stored_tensors(read_metadata(path), 'model'),
            model_state,
            f'The resume checkpoint {path}',
        )
        tensors = {
            'model': model_state,
            'optimizer_state': _split_tensors(optimizer_state['state'])[0],
        }
        with _quiet_without_process_group():
            dcp.load(tensors, storage_reader=FileSystemReader(path))
        merged = _merge_state(tensors['optimizer_state'], checkpoint['optimizer_extra_state'])
        full = {'state': merged, 'param_groups': checkpoint['optimizer_param_groups']}
        set_state_dict(model, optimizer, model_state_dict=tensors['model'], optim_state_dict=full)
        _agree_on_finite_state(state, path)
        return
    # A single file (a DDP run, or converted): every rank reads it whole and keeps its shard.
    weights = canonical_keys(checkpoint['model'])  # e.g. an official file's rebuilt buffers
    check_fits(
        {k: tuple(v.shape) for k, v in weights.items()},
        model_state,
        f'The resume checkpoint {path}',
    )
    saved = checkpoint['optimizer']
    if all('param_names' in group for group in saved['param_groups']):
        named = optimizer_state_by_name(saved)
    else:  # the official code's: named by rebuilding its groups for this model
        named = named_optimizer_state(saved, optimizer, model, config)
        if logger is not None:
            logger.info(
                'Optimizer state of the official code loaded by parameter name; learning '
                'rates and weight decay come from this config.'
            )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=named,
        options=StateDictOptions(full_state_dict=True),
    )  # a single file's values were checked finite when it was verified (verify_checkpoint)


def _agree_on_finite_state(state, path):
    """Collective: raise on every rank if the weights or optimizer state any rank holds now are
    not finite (each rank checks its own shards)."""
    error = None
    try:
        check_finite(
            {
                'model': {k: local_tensor(v) for k, v in state.model.state_dict().items()},
                'optimizer': {
                    str(i): {k: local_tensor(v) for k, v in s.items()}
                    for i, s in enumerate(state.optimizer.state.values())
                },
            },
            f'The resume checkpoint {path}',
        )
    except CheckpointError as e:
        error = e
    agree_on_failure(error)


# -----------------------------------------------------------------------------------------------
# Conversion to the single-file layout
# -----------------------------------------------------------------------------------------------
def read_sharded_checkpoint(path, model_only=False):
    """The single-file checkpoint (the keys of ckpt_epoch_*.pth, official names, every tensor whole
    on the CPU) of the sharded directory `path`, read in this process without a process group.
    `model_only` skips the optimizer state (two thirds of the memory under AdamW)."""
    progress = verify_sharded_checkpoint(path)
    metadata = read_metadata(path)
    wanted = {
        flat: md
        for flat, md in metadata.state_dict_metadata.items()
        if not model_only or metadata.planner_data[flat][0] == 'model'
    }
    flat = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in wanted.items()}
    try:
        with _quiet_without_process_group():
            dcp.load(
                flat,
                storage_reader=FileSystemReader(path),
                planner=DefaultLoadPlanner(flatten_state_dict=False),
                no_dist=True,
            )
    except CheckpointException as e:  # a shard DCP cannot read: truncated or damaged
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        causes = {f'{type(c).__name__}: {c}'.rstrip(': ') for c in errors}
        raise CheckpointError(
            f'The sharded checkpoint {path} cannot be read: a shard (.distcp file) is '
            f'truncated or damaged ({"; ".join(sorted(causes))[:300]}). Use an earlier '
            f'checkpoint, or copy the whole directory again.'
        ) from None
    nested = {'model': {}, 'optimizer_state': {}}
    for key, tensor in flat.items():
        top, name, *rest = metadata.planner_data[key]
        if rest:
            nested[top].setdefault(name, {})[rest[0]] = tensor
        else:
            nested[top][name] = tensor
    checkpoint = {'model': nested['model']}
    if not model_only:
        state = _merge_state(nested['optimizer_state'], progress['optimizer_extra_state'])
        checkpoint['optimizer'] = optimizer_state_by_index(
            {'state': state, 'param_groups': progress['optimizer_param_groups']}
        )
    checkpoint.update((k, v) for k, v in progress.items() if k not in _OPTIMIZER_KEYS)
    return checkpoint


def read_checkpoint(path, purpose='checkpoint', model_only=False):
    """A checkpoint dict of either layout: a complete sharded directory (read whole on the CPU,
    see read_sharded_checkpoint) or a single file (utils.safe_load)."""
    if os.path.isfile(os.path.join(path, MARKER)):
        return read_sharded_checkpoint(path, model_only)
    return load_checkpoint_file(path, purpose)
