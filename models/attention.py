"""Attention and position-index helpers shared by the Swin, SwinV2 and ViT encoders.

Swin attention goes through `attention`, which calls torch's fused
`scaled_dot_product_attention` with position biases and window masks as an additive float mask,
except when training on a CPU: there SDPA's backward is its math fallback plus checks for fully
masked rows, and the explicit formula measured as fast or faster (benchmarks/RESULTS.md). The
ViT's (timm's Beit attention) calls SDPA too. `eager_attention(model=...)` switches both to the
textbook softmax(QK^T * scale + bias) V for tests and debugging; `eager_attention(False)` makes
`attention` call SDPA everywhere.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import gen_relative_position_index

_use_eager = None  # None: textbook formula only for CPU training; True / False: always / never


@contextlib.contextmanager
def eager_attention(enabled=True, model=None):
    """Within this context `attention` computes softmax(QK^T * scale + bias) V explicitly, and so
    do the timm attention modules inside `model` (they pick their path by a per-module
    `fused_attn` flag, set when they are built)."""
    global _use_eager
    timm_modules = [] if model is None else [m for m in model.modules() if hasattr(m, 'fused_attn')]
    previous = _use_eager, [m.fused_attn for m in timm_modules]
    _use_eager = enabled
    for module in timm_modules:
        module.fused_attn = module.fused_attn and not enabled
    try:
        yield
    finally:
        _use_eager = previous[0]
        for module, fused in zip(timm_modules, previous[1], strict=True):
            module.fused_attn = fused


def is_eager():
    """Whether `eager_attention()` forces the textbook formula."""
    return _use_eager is True


def attention(q, k, v, bias=None, scale=None, dropout_p=0.0):
    """softmax(q @ k^T * scale + bias) @ v.

    q, k, v: (B, heads, N, head_dim); bias: additive float, broadcastable to (B, heads, N, N);
    scale: None means head_dim ** -0.5. Returns (B, heads, N, head_dim).
    """
    if bias is not None:
        bias = bias.to(q.dtype)  # SDPA wants the mask in the query's dtype (e.g. under autocast)
    textbook = _use_eager
    if textbook is None:
        textbook = q.device.type == 'cpu' and q.requires_grad and torch.is_grad_enabled()
    if not textbook:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    weights = F.dropout(logits.softmax(dim=-1), p=dropout_p)
    return weights @ v


def add_qv_bias(module, dim, enabled):
    """Give `module` zero-initialised `q_bias` and `v_bias` Parameters (dim,), or None for both."""
    if enabled:
        module.q_bias = nn.Parameter(torch.zeros(dim))
        module.v_bias = nn.Parameter(torch.zeros(dim))
    else:
        module.q_bias = module.v_bias = None


def qkv_with_qv_bias(x, qkv, q_bias, v_bias):
    """The fused q/k/v projection with learnable q and v biases and a fixed zero k bias
    (BEiT, SwinV2). x: (..., C) -> (..., 3 * C'); biases may be None (no bias at all)."""
    bias = None
    if q_bias is not None:
        bias = torch.cat((q_bias, torch.zeros_like(v_bias, requires_grad=False), v_bias))
    return F.linear(x, qkv.weight, bias)


def relative_position_index(window_size):
    """Index into a ((2Wh-1)(2Ww-1), heads) bias table for every pair of positions in a window:
    offsets row-major over the (2Wh-1, 2Ww-1) grid, shifted to start at 0 (Swin, BEiT).

    window_size: (Wh, Ww). Returns a LongTensor (Wh*Ww, Wh*Ww). timm's helper, checked identical
    to the formula written out (tests/test_timm_helpers.py).
    """
    return gen_relative_position_index(tuple(window_size))


def gather_position_bias(table, index):
    """Look a (num_offsets, heads) bias table up at an (N, N) index: returns (heads, N, N)."""
    n = index.shape[0]
    # Contiguous: the fused GPU kernels need a mask with unit stride in its last dimension.
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def register_derived_buffer(module, name, tensor):
    """Register a buffer that is a pure function of the config (index tables, shift masks,
    coordinate tables).

    It is not saved (persistent=False), and the copy that official checkpoints carry is dropped when
    loading, so official checkpoints load strictly and windows may change between pre-training and
    fine-tuning.
    """
    module.register_buffer(name, tensor, persistent=False)
    ignore_saved_copy(module, name)


def ignore_saved_copy(module, name):
    """Drop `name` from state dicts loaded into `module` (a non-persistent buffer that official
    checkpoints carry anyway), so that they still load strictly."""

    def drop_saved_copy(module, state_dict, prefix, *args):
        state_dict.pop(prefix + name, None)

    module.register_load_state_dict_pre_hook(drop_saved_copy)


def raise_recompile_limit(limit):
    """Let dynamo keep at least `limit` graphs per function (torch < 2.7 calls it cache_size)."""
    config = torch._dynamo.config
    for name, value in (
        ('recompile_limit', limit),
        ('accumulated_recompile_limit', 4 * limit),
        ('cache_size_limit', limit),
        ('accumulated_cache_size_limit', 4 * limit),
    ):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), value))
