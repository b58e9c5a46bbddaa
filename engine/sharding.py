"""How the model is spread over ranks: DDP (every rank holds everything) or FSDP2 (parameters,
gradients and optimizer state sharded), chosen by TRAIN.SHARDING.

FSDP uses PyTorch's own `fully_shard`, one unit per transformer block (every member of a
`blocks` ModuleList: the Swin stages, ViT) plus the root, which holds the rest (patch embedding,
patch merging, norms, prediction head, mask token). Parameter names stay the official ones,
so weight-decay groups, layer decay and checkpoints see the same names as under DDP.

Composition: a block is compiled (nn.Module.compile(), which keeps the module object) before
`fully_shard` wraps that same block, never after, so FSDP's hooks stay outside the compiled graph.
Activation checkpointing (TRAIN.USE_CHECKPOINT) wraps the call of the sharded block in its stage;
its recomputation in the backward pass runs while FSDP holds that block's gathered parameters.

Mixed precision follows the autocast dtype of the run (engine.trainer.autocast_dtype): with bf16 the
parameters are all-gathered and computed in bf16 while the sharded master weights, the gradient
reduction and the optimizer stay fp32; without autocast (the CPU, or --disable-amp) everything is
fp32.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from yacs.config import CfgNode

from models import transformer_blocks
from utils.distributed import DistInfo, is_fsdp, wrap_ddp

# Methods other than forward() that run the sharded model (reconstruction grids); FSDP must
# all-gather the root's parameters for them too.
EXTRA_FORWARD_METHODS = ('predict_image',)


def mixed_precision_policy(amp_dtype):
    """bf16/fp16 parameters with fp32 gradient reduction, or all fp32 (amp_dtype None).

    Forward inputs are not cast: autocast picks each op's precision as under DDP, so the residual
    stream and the loss targets stay fp32.
    """
    if amp_dtype is None:
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(
        param_dtype=amp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


@torch.no_grad()
def broadcast_from_rank0(model):
    """Give every rank rank 0's parameters and buffers (DDP does this itself; FSDP does not, and
    each rank seeds its initialisation differently)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor, src=0)


def shard_model(model, amp_dtype=None):
    """Apply FSDP2 in place (one unit per block, then the root) and return the model; every rank
    must call this with the same model built on its device."""
    broadcast_from_rank0(model)
    policy = mixed_precision_policy(amp_dtype)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for method in EXTRA_FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def wrap_model(
    config: CfgNode, model: nn.Module, dist_info: DistInfo, amp_dtype=None, logger=None
) -> nn.Module:
    """The module the training loop calls: DDP- or FSDP-wrapped under torchrun, the model itself
    for one process. FSDP shards `model` in place (the optimizer must be built afterwards)."""
    if not dist_info.distributed:
        if config.TRAIN.SHARDING == 'fsdp' and logger is not None:
            logger.info(
                'TRAIN.SHARDING fsdp with one process: nothing to shard, the model trains '
                'whole; checkpoints keep the sharded layout'
            )
        return model
    if config.TRAIN.SHARDING == 'fsdp':
        shard_model(model, amp_dtype)
        if logger is not None:
            logger.info(
                f'FSDP: {len(transformer_blocks(model))} block units + root over '
                f'{dist_info.world_size} ranks, parameters/compute in '
                f'{amp_dtype or torch.float32}, gradient reduction in fp32'
            )
        return model
    return wrap_ddp(model, dist_info.device)


def gradient_sync(model, enabled):
    """Context for one micro-step's backward: with `enabled` False the gradients only accumulate
    locally (DDP's no_sync; FSDP's set_requires_gradient_sync(False), which keeps the unsharded
    gradients until the last micro-step)."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(model, 'no_sync'):
        return model.no_sync()
    return contextlib.nullcontext()


def full_tensor(tensor):
    """A DTensor (e.g. the global gradient norm of sharded gradients) as a plain tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state_dict(model):
    """The whole state dict with official names on every rank (collective under FSDP: call it on
    every rank), e.g. for model_best.pth."""
    if is_fsdp(model):
        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return model.state_dict()


def lockstep_extra_batches(model, num_batches, device):
    """How many extra forward passes this rank must run so every rank runs as many as the
    busiest one: FSDP all-gathers inside each forward, so ranks with uneven evaluation shards
    must keep calling it. 0 outside FSDP."""
    if not (is_fsdp(model) and dist.is_initialized()):
        return 0
    most = torch.tensor([num_batches], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - num_batches
