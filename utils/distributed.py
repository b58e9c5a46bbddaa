"""Process-group set-up for a single process or torchrun (NCCL on GPU, gloo on CPU), and the
collectives the other layers use: sums and maxima, object gathers, and agreeing on a failure
(`on_main_rank`, `agree_on_failure`), so that one rank's error never leaves the others running.

The module whose parameter names are the official ones is timm's `timm.utils.unwrap_model` (DDP's
.module and torch.compile's ._orig_mod removed; tests/test_timm_helpers.py)."""

import inspect
import os
import pickle
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from utils.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init_distributed(local_rank=0):
    """Join the process group torchrun describes in the environment, or run as one process.

    RANK, WORLD_SIZE and LOCAL_RANK come from the environment as torchrun sets them (multi-node
    rendezvous included); without them this is a single process and no group is created.
    """
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', local_rank))
    if torch.cuda.is_available():
        local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if local_world_size > torch.cuda.device_count():
            # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") after a long start-up.
            raise ConfigError(
                f'torchrun started {local_world_size} processes on this node but it '
                f'has {torch.cuda.device_count()} GPU(s); use --nproc_per_node '
                f'{torch.cuda.device_count()} (one process per GPU).'
            )
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        dist.init_process_group(
            backend,
            init_method='env://',
            world_size=world_size,
            rank=rank,
            device_id=device if device.type == 'cuda' else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def wrap_ddp(model, device):
    """DistributedDataParallel without per-forward buffer broadcasts (the official
    broadcast_buffers=False; the models' buffers are derived index tables, and BatchNorm
    statistics are broadcast once per epoch instead: broadcast_batchnorm_stats). torch >= 2.14
    spells it forward_sync_buffers, older versions broadcast_buffers.

    Gradients are views into the all-reduce buckets (gradient_as_bucket_view): one copy of the
    gradients in memory instead of two. static_graph stays off: it only helps reentrant
    checkpointing and unused parameters, neither of which occurs here.
    """
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = (
        {'forward_sync_buffers': False}
        if 'forward_sync_buffers' in params
        else {'broadcast_buffers': False}
    )
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == 'cuda' else None,
        gradient_as_bucket_view=True,
        **no_sync,
    )


def broadcast_batchnorm_stats(model, src=0):
    """Give every rank the BatchNorm running statistics of rank `src` (MAE's linear probe: DDP's
    buffer broadcast). Our DDP never syncs buffers, so in training mode each rank's BatchNorm
    (the linear probe's head) tracks its own batches; call this before evaluating or saving."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    norms = (
        torch.nn.BatchNorm1d,
        torch.nn.BatchNorm2d,
        torch.nn.BatchNorm3d,
        torch.nn.SyncBatchNorm,
    )
    for module in model.modules():
        if isinstance(module, norms):
            for buffer in module.buffers():
                dist.broadcast(buffer, src)


def seed_everything(seed):
    """Seed the global RNGs of this process (dropout, drop path, Mixup)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum `tensor` over ranks in place (a no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj):
    """List of `obj` from every rank (just [obj] for a single process)."""
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def _portable(error):
    """`error` if it pickles (so other ranks can raise it), else a RuntimeError with its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # any exception type may fail to pickle
        return RuntimeError(f'{type(error).__name__}: {error}')


def agree_on_failure(error):
    """Collective: every rank passes the exception it met, or None. When any rank failed, every
    rank raises: its own exception, or the first failing rank's (same type and message)."""
    errors = all_gather_objects(_portable(error))
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise error if error is not None else first


def on_main_rank(fn, is_main):
    """Collective: rank 0 (`is_main`) runs fn() and every rank returns its result, or raises its
    exception: rank 0 tries, every rank agrees."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except Exception as e:  # raised on every rank by agree_on_failure
            error = e
    agree_on_failure(error)
    return all_gather_objects(result)[0]


def is_fsdp(model):
    """Whether `model` is sharded by FSDP2 (`fully_shard`)."""
    return isinstance(model, FSDPModule)


def local_tensor(tensor):
    """This rank's part of `tensor`: the local shard of a DTensor (FSDP), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
