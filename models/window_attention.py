"""Attention inside Swin windows with a position bias and the shifted-window mask, in two exact
formulations (MODEL.WINDOW_ATTENTION; benchmarks/attention_speed.py times them):

- 'sdpa' (default): torch's scaled_dot_product_attention, the windows folded into the head axis so
  the (window, head) bias broadcasts over the batch instead of being copied once per image.
- 'flex': FlexAttention, whose score_mod adds the bias of (window, head, query, key) inside the
  fused kernel, so no (windows, heads, N, N) bias is read from memory per image. It is compiled
  (torch.compile) and its backward runs on CUDA only; with attention dropout it falls back to sdpa.

Both compute softmax(q k^T * scale + bias + mask) v; `models.attention.eager_attention()` turns
either into the textbook formula that tests compare them with.
"""

import functools

import torch

from utils.registry import require_choice

from .attention import attention, is_eager, raise_recompile_limit

WINDOW_ATTENTION = ('sdpa', 'flex')


def window_bias(position_bias, window_mask):
    """(heads, N, N) bias and (num_windows, N, N) mask or None -> (num_windows or 1, heads, N,
    N)."""
    if window_mask is None:
        return position_bias.unsqueeze(0)
    return position_bias.unsqueeze(0) + window_mask.unsqueeze(1)


def _sdpa_windows(q, k, v, position_bias, window_mask, scale, dropout_p):
    if window_mask is None:
        return attention(q, k, v, position_bias.unsqueeze(0), scale, dropout_p)
    windows_batch, heads, n, head_dim = q.shape
    num_windows = window_mask.shape[0]
    # Fold the windows into the head axis so the (window, head) bias broadcasts over the batch
    # instead of being copied once per image.
    bias = window_bias(position_bias, window_mask).reshape(1, -1, n, n)
    folded = (windows_batch // num_windows, num_windows * heads, n, head_dim)
    out = attention(q.reshape(folded), k.reshape(folded), v.reshape(folded), bias, scale, dropout_p)
    return out.reshape(windows_batch, heads, n, head_dim)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # One cache entry per window shape and shift of the model (and train/eval): more than
    # dynamo's default limit of 8 for Swin-B, past which it would run the slow eager reference.
    raise_recompile_limit(64)
    return torch.compile(flex_attention, dynamic=False)


def _flex_windows(q, k, v, position_bias, window_mask, scale):
    bias = window_bias(position_bias, window_mask)
    num_windows = bias.shape[0]

    def add_bias(score, b, h, q_idx, kv_idx):
        # Windows are image-major: window w of image i is batch entry i * num_windows + w.
        return score + bias[b % num_windows, h, q_idx, kv_idx]

    return _compiled_flex_attention()(q, k, v, score_mod=add_bias, scale=scale)


def attend_windows(q, k, v, position_bias, window_mask, scale, dropout_p, kernel='sdpa'):
    """Attention inside each window with a position bias and an optional shift mask.

    q, k, v: (B * num_windows, heads, N, head_dim); position_bias: (heads, N, N);
    window_mask: (num_windows, N, N) or None; kernel: one of WINDOW_ATTENTION.
    Returns (B * num_windows, heads, N, head_dim).
    """
    if kernel == 'flex' and not dropout_p and not is_eager():
        return _flex_windows(q, k, v, position_bias, window_mask, scale)
    return _sdpa_windows(q, k, v, position_bias, window_mask, scale, dropout_p)


def check_window_attention(kernel):
    """MODEL.WINDOW_ATTENTION."""
    require_choice('MODEL.WINDOW_ATTENTION', kernel, WINDOW_ATTENTION, 'kernels')


def set_window_attention(model, kernel):
    """Use `kernel` (one of WINDOW_ATTENTION) in every window attention layer of `model`."""
    check_window_attention(kernel)
    for module in model.modules():
        if hasattr(module, 'window_kernel'):
            module.window_kernel = kernel
    return model
