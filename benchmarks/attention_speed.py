"""Swin window attention formulations, timed side by side and checked against the textbook formula.

    python -m benchmarks.attention_speed --device cpu --threads 1 --out attention_cpu.md
    python -m benchmarks.attention_speed --device cuda --out attention_gpu.md  # bf16, batch 128

Every formulation computes softmax(q k^T * scale + position bias + shift mask) v for the windows of
one Swin-B stage at 192 px (window 6, shifted); they differ only in how the bias reaches the
kernel (models/window_attention.py):
- textbook: explicit q @ k^T, add, softmax, @ v (models.attention.eager_attention, the reference);
- sdpa: F.scaled_dot_product_attention with the windows folded into the head axis, so the
  (window, head) bias broadcasts over the batch instead of being copied per image (our default);
- sdpa_expanded: the same kernel with the bias materialised per image (B * windows, heads, N, N);
- flex: FlexAttention (compiled) with a score_mod that adds the bias of (window, head, q, k);
  its backward runs on CUDA only, so on a CPU it is timed forward-only;
- sdpa_efficient / sdpa_cudnn (CUDA): sdpa restricted to one of the fused kernels that take a bias.
Forward + backward (the training case) and forward-only are timed, interleaved over `--rounds`;
the max abs difference to the fp32 textbook result is reported for each.
"""

import argparse
import os
import statistics
import time

import torch

from benchmarks.report import machine_description, write_report
from models.attention import eager_attention
from models.swin_transformer import shifted_window_mask
from models.window_attention import WINDOW_ATTENTION, attend_windows, window_bias

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Swin-B at 192 px, window 6: (feature map side, heads) of stages 1 and 3 (the most blocks).
STAGES = {'stage1': (48, 4), 'stage3': (12, 16)}
HEAD_DIM, WINDOW = 32, 6


def textbook(q, k, v, bias, mask, scale):
    with eager_attention():
        return attend_windows(q, k, v, bias, mask, scale, 0.0, kernel='sdpa')


def sdpa_expanded(q, k, v, bias, mask, scale):
    num_windows = mask.shape[0]
    full = window_bias(bias, mask).repeat(q.shape[0] // num_windows, 1, 1, 1)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=full.to(q.dtype), scale=scale
    )


def _kernel(kernel):
    def run(q, k, v, bias, mask, scale):
        with eager_attention(False):  # the kernel itself, even where `attention` would not pick it
            return attend_windows(q, k, v, bias, mask, scale, 0.0, kernel=kernel)

    return run


def _sdpa_backend(backend):
    def run(q, k, v, bias, mask, scale):
        with torch.nn.attention.sdpa_kernel([backend]):
            return _kernel('sdpa')(q, k, v, bias, mask, scale)

    return run


def make_variants(cuda):
    variants = {'textbook': textbook, 'sdpa_expanded': sdpa_expanded}
    variants.update({name: _kernel(name) for name in WINDOW_ATTENTION})
    if cuda:  # which of SDPA's kernels that take a bias is fastest (SDPA picks one by itself)
        backends = torch.nn.attention.SDPBackend
        variants['sdpa_efficient'] = _sdpa_backend(backends.EFFICIENT_ATTENTION)
        variants['sdpa_cudnn'] = _sdpa_backend(backends.CUDNN_ATTENTION)
    return variants


def inputs(stage, batch_size, device, dtype, requires_grad):
    side, heads = STAGES[stage]
    num_windows, n = (side // WINDOW) ** 2, WINDOW * WINDOW
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch_size * num_windows, heads, n, HEAD_DIM, generator=gen)
        .to(device, dtype)
        .requires_grad_(requires_grad)
        for _ in range(3)
    )
    bias = torch.randn(heads, n, n, generator=gen).to(device).requires_grad_(requires_grad)
    mask = shifted_window_mask((side, side), WINDOW, WINDOW // 2).to(device)
    return q, k, v, bias, mask


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=None, help='GPU 128, CPU 4')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--reps', type=int, default=None, help='calls per round (GPU 20, CPU 2)')
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--variants', default=None, help='comma-separated (default: all)')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == 'cuda'
    batch = args.batch_size or (128 if cuda else 4)
    reps = args.reps or (20 if cuda else 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    variants = make_variants(cuda)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(',')}
    lines = [
        f'Machine: {machine_description(args.device)}.',
        '',
        f'Window attention, Swin-B at 192 px (window 6, shifted), batch {batch}, {dtype}, '
        f'{torch.get_num_threads()} thread(s); median of {args.rounds} interleaved rounds of '
        f'{reps} calls.',
        '',
        '| stage | formulation | fwd+bwd ms | fwd ms | max abs diff to fp32 textbook |',
        '|---|---|---|---|---|',
    ]
    for stage in STAGES:
        q, k, v, bias, mask = inputs(stage, batch, args.device, torch.float32, False)
        reference = textbook(q, k, v, bias, mask, HEAD_DIM**-0.5)
        times = {(name, mode): [] for name in variants for mode in ('train', 'fwd')}
        errors, skipped = {}, {}
        qq, kk, vv = (t.to(dtype) for t in (q, k, v))
        # One set of inputs per mode, reused by every call (their gradients reset between calls).
        timed_inputs = {
            mode: inputs(stage, batch, args.device, dtype, mode == 'train')
            for mode in ('train', 'fwd')
        }
        for name, fn in variants.items():
            try:
                errors[name] = (
                    (fn(qq, kk, vv, bias, mask, HEAD_DIM**-0.5).float() - reference)
                    .abs()
                    .max()
                    .item()
                )
            except Exception as e:  # a formulation this device lacks is reported
                skipped[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:80]}'
        for _ in range(args.rounds):
            for name, fn in variants.items():
                if name in skipped:
                    continue
                for mode in ('train', 'fwd'):
                    if mode == 'train' and name == 'flex' and not cuda:
                        continue  # FlexAttention has no CPU backward
                    data = timed_inputs[mode]
                    context = torch.enable_grad() if mode == 'train' else torch.no_grad()

                    def call(fn=fn, data=data, mode=mode):
                        out = fn(*data, HEAD_DIM**-0.5)
                        if mode == 'train':
                            out.sum().backward()
                            for tensor in data:
                                tensor.grad = None

                    with context:
                        call()  # warm-up (and compilation), the backward included
                        sync()
                        start = time.perf_counter()
                        for _ in range(reps):
                            call()
                        sync()
                    times[(name, mode)].append((time.perf_counter() - start) / reps * 1000)
        for name in variants:
            if name in skipped:
                lines.append(f'| {stage} | {name} | not available: {skipped[name]} | | |')
                continue
            cell = {
                m: (f'{statistics.median(times[(name, m)]):.2f}' if times[(name, m)] else 'n/a')
                for m in ('train', 'fwd')
            }
            lines.append(
                f'| {stage} | {name} | {cell["train"]} | {cell["fwd"]} | {errors[name]:.1e} |'
            )
        print('\n'.join(lines[-len(variants) :]), flush=True)
    write_report(lines, args.out)


if __name__ == '__main__':
    main()
