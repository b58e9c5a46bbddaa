"""Per-GPU memory of a SimMIM pre-training step under DDP or FSDP, with or without activation
checkpointing (python -m tools.plan_memory; checked against measured peaks by
benchmarks/memory_check.py): weights, gradients and AdamW state counted from the model on the meta
device, activations measured by a forward pass of a one-block-per-stage copy, and the peak of the
backward pass and of the optimizer step. The memory model, term by term: docs/scaling.md.
"""

import functools
from dataclasses import dataclass

import timm.layers.weight_init
import torch
import torch.nn.functional as F

from config import load_config
from engine.precision import autocast
from models import build_model, transformer_blocks
from utils.tasks import PRETRAIN

GIB = 2**30
ADAMW_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per parameter
# Saved bytes of a SwinV2 block under CPU bf16 autocast over fp32, without attention matrices
# (measured: 111.5 / 183.6 MiB); the residual stream, norms and losses stay fp32.
BF16_ACTIVATION_RATIO = 0.61


def build_on_meta(config, task=PRETRAIN):
    """The model of `config` on the meta device: shapes and counts without memory. Initialisation
    is skipped (timm's truncated normal alone takes seconds per large model there)."""
    real_init = timm.layers.weight_init._trunc_normal_
    timm.layers.weight_init._trunc_normal_ = lambda tensor, *args: tensor
    try:
        with torch.device('meta'):
            return build_model(config, task)
    finally:
        timm.layers.weight_init._trunc_normal_ = real_init


def _numel(module):
    return sum(p.numel() for p in module.parameters())


@dataclass
class ModelStats:
    params: int
    buffer_bytes: int
    block_params: list  # encoder blocks in forward order
    largest_unit: int  # parameters of the largest FSDP block unit
    root_params: int  # parameters outside every block unit (FSDP's root unit)


def model_stats(config):
    model = build_on_meta(config)
    units = transformer_blocks(model)
    return ModelStats(
        params=_numel(model),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        block_params=[_numel(b) for b in transformer_blocks(model.encoder)],
        largest_unit=max(map(_numel, units), default=0),
        root_params=_numel(model) - sum(map(_numel, units)),
    )


# -----------------------------------------------------------------------------------------------
# Activations
# -----------------------------------------------------------------------------------------------
_SCALED_DOT_PRODUCT_ATTENTION = F.scaled_dot_product_attention


class _FusedAttentionSaves(torch.autograd.Function):
    """Attention that saves what the fused GPU kernels save (q, k, v, output, log-sum-exp), for
    measuring GPU activations on the CPU; forward only."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale):
        with torch.no_grad():
            out = _SCALED_DOT_PRODUCT_ATTENTION(q, k, v, attn_mask=attn_mask, scale=scale)
        log_sum_exp = q.new_empty(q.shape[:-1])
        ctx.save_for_backward(
            q, k, v, out, log_sum_exp, *([attn_mask] if attn_mask is not None else [])
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError('only used to measure what the forward pass saves')


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FusedAttentionSaves.apply(q, k, v, attn_mask, dropout_p, is_causal, scale)


@dataclass
class BytesPerBatch:
    """bytes = at_zero + per_image * batch."""

    at_zero: float
    per_image: float

    def __call__(self, batch):
        return self.at_zero + self.per_image * batch


@dataclass
class Activations:
    blocks: list  # BytesPerBatch per encoder block of the full model, forward order
    block_inputs: list  # BytesPerBatch per block: what a checkpointed block keeps
    rest: BytesPerBatch  # embedding, patch merging, head and loss


def _stage_depths(config):
    """(blocks per stage, the --opts that keep one block per stage)."""
    if config.MODEL.TYPE == 'vit':
        return [config.MODEL.VIT.DEPTH], ['MODEL.VIT.DEPTH', '1']
    key = 'SWINV2' if config.MODEL.TYPE == 'swinv2' else 'SWIN'
    depths = list(config.MODEL[key].DEPTHS)
    return depths, [f'MODEL.{key}.DEPTHS', str([1] * len(depths))]


def _saved_bytes_per_block(model, blocks, images, mask, autocast_dtype):
    """({block index or 'rest': bytes autograd saves}, {block index: input bytes}) of one
    forward."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen, owner = set(), ['rest']
    saved, inputs = {'rest': 0}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[owner[0]] = saved.get(owner[0], 0) + storage.nbytes()
        return tensor

    def enter(index):
        def hook(module, args):
            owner[0] = index
            inputs[index] = args[0].numel() * args[0].element_size()

        return hook

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: owner.__setitem__(0, 'rest')) for b in blocks]
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            autocast(images.device, autocast_dtype),
        ):
            _loss = model(images, mask)  # keeps the saved tensors alive until here
    finally:
        for handle in handles:
            handle.remove()
    return saved, inputs


@functools.lru_cache(maxsize=16)
def measure_activations(cfg_path, opts=(), device='cpu', target='cuda', precision='bf16'):
    """Activations of the pre-training model of `cfg_path` (+ `opts`), measured on `device` for a
    run on `target` in `precision` (see the module docstring)."""
    config = load_config(cfg_path, list(opts))
    depths, one_block_per_stage = _stage_depths(config)
    small = load_config(
        cfg_path, list(opts) + one_block_per_stage + ['TRAIN.USE_CHECKPOINT', 'False']
    )
    torch.manual_seed(0)
    model = build_model(small).to(device).train()
    blocks = transformer_blocks(model.encoder)
    on_gpu = torch.device(device).type == 'cuda'
    autocast_dtype = torch.bfloat16 if on_gpu and precision == 'bf16' else None
    scale = (
        BF16_ACTIVATION_RATIO if precision == 'bf16' and not on_gpu and target == 'cuda' else 1.0
    )
    if target == 'cuda' and not on_gpu:
        F.scaled_dot_product_attention = _fused_attention
    try:
        samples = []
        for batch in (1, 2):
            size = config.DATA.IMG_SIZE
            images = torch.randn(batch, model.in_chans, size, size, device=device)
            grid = size // model.patch_size
            mask = (torch.rand(batch, grid, grid, device=device) < config.DATA.MASK_RATIO).long()
            samples.append(_saved_bytes_per_block(model, blocks, images, mask, autocast_dtype))
    finally:
        F.scaled_dot_product_attention = _SCALED_DOT_PRODUCT_ATTENTION

    def line(one, two, scale=scale):
        return BytesPerBatch((2 * one - two) * scale, (two - one) * scale)

    (saved1, inputs1), (saved2, inputs2) = samples
    per_stage = [line(saved1.get(i, 0), saved2.get(i, 0)) for i in range(len(blocks))]
    # Block inputs are the residual stream, which autocast leaves in fp32.
    stage_inputs = [line(inputs1[i], inputs2[i], 1.0) for i in range(len(blocks))]

    def expand(values):
        return [v for v, depth in zip(values, depths, strict=True) for _ in range(depth)]

    return Activations(
        expand(per_stage), expand(stage_inputs), line(saved1['rest'], saved2['rest'])
    )


# -----------------------------------------------------------------------------------------------
# The estimate
# -----------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """Bytes per GPU; `peak` is what torch.cuda.max_memory_allocated would report."""

    weights: float  # fp32 master weights (sharded under FSDP) and buffers
    optimizer: float
    gradients: float  # all of them, at the optimizer step
    activations: float  # kept for backward at the end of the forward pass
    other: float  # DDP buckets, or FSDP's gathered root and block units
    peak: float


# The temporaries of one block's backward pass, as a fraction of what the block saved: fitted to
# the peak measured on the CPU for checkpointed SwinV2 blocks (the one fitted number; see
# benchmarks/RESULTS.md for the cases that check it).
BACKWARD_TEMPORARIES = 0.25


def estimate(
    stats, activations, batch, world_size=1, sharding='ddp', checkpointing=False, precision='bf16'
):
    """The Estimate for `batch` images per GPU (see the module docstring)."""
    params, compute_bytes = stats.params, (2 if precision == 'bf16' else 4)
    share = 1.0 / world_size if sharding == 'fsdp' else 1.0
    weights = 4 * params * share + stats.buffer_bytes
    optimizer = ADAMW_BYTES * params * share
    if sharding == 'fsdp':
        other = (stats.root_params + 2 * stats.largest_unit) * compute_bytes
        in_flight_gradient = stats.largest_unit * (compute_bytes + 4)  # then fp32 to reduce
    else:
        other = 4 * params if world_size > 1 else 0.0  # DDP's gradient buckets
        in_flight_gradient = 0.0
    persistent = weights + optimizer + other

    blocks = [a(batch) for a in activations.blocks]
    kept = [x(batch) for x in activations.block_inputs] if checkpointing else blocks
    rest = activations.rest(batch)
    gradients = 4 * (params - sum(stats.block_params)) * share  # the rest's, counted from the start
    backward_peak = 0.0
    for i in reversed(range(len(blocks))):
        gradients += 4 * stats.block_params[i] * share
        recomputed = blocks[i] if checkpointing else 0.0
        live = rest + sum(kept[: i + 1]) + recomputed + BACKWARD_TEMPORARIES * blocks[i]
        backward_peak = max(backward_peak, live + gradients + in_flight_gradient)
    peak = persistent + max(backward_peak, 4 * params * share)  # the optimizer step
    return Estimate(weights, optimizer, 4 * params * share, rest + sum(kept), other, peak)


BATCH_SEARCH_LIMIT = 4096  # largest_batch looks no further: an answer equal to it means ">= it"


def largest_batch(fits, limit=BATCH_SEARCH_LIMIT):
    """The largest batch b in [1, limit] with fits(b) (monotone), or 0 if none; `limit` itself
    when it fits, so a larger one may fit too."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low
