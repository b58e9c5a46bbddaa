"""Where a pre-training step's time goes: torch.profiler over a few steps of one speed.py row.

    python -m benchmarks.profile_step --model swin_tiny --variant eager --device cpu --threads 1
    python -m benchmarks.profile_step --model swin_b --variant official --official-dir DIR

Builds the row exactly as benchmarks/speed.py does (same model, optimizer, precision and step),
warms it up, profiles `--steps` steps and writes the operators with the most self time (CPU time on
a CPU, CUDA kernel time on a GPU) as a markdown table, grouped into a few families (matrix
products, attention, normalisation, element-wise, copies and layout, optimizer) so that runs can be
compared at a glance. `--trace` also writes a Chrome trace.
"""

import argparse
import os

from benchmarks import speed
from benchmarks.report import machine_description, write_report

# First match wins; names are aten operator names (and CUDA kernel names on a GPU). Compiled code
# comes first: its generated names also contain the names of the operations it fused.
FAMILIES = (
    (
        'compiled kernels',
        ('triton', 'cpp_fused', 'graph_', 'compiledfunction', 'compiledfxgraph', 'inductor'),
    ),
    ('attention', ('attention', 'softmax', 'flash', 'fmha', 'efficient')),
    ('optimizer', ('adam', 'foreach', 'multi_tensor', 'clip')),
    (
        'matrix products',
        (
            'mm',
            'addmm',
            'bmm',
            'matmul',
            'linear',
            'conv',
            'gemm',
            'sm90',
            'cutlass',
            'nvjet',
            'xmma',
        ),
    ),
    ('normalisation', ('layer_norm', 'layernorm', 'native_layer_norm')),
    (
        'copies and layout',
        (
            'copy',
            'clone',
            'contiguous',
            'cat',
            'roll',
            'permute',
            'index',
            'gather',
            'scatter',
            'repeat',
            'pixel_shuffle',
            'transpose',
        ),
    ),
    (
        'element-wise',
        (
            'add',
            'mul',
            'div',
            'sub',
            'gelu',
            'sigmoid',
            'relu',
            'where',
            'fill',
            'abs',
            'sum',
            'mean',
            'exp',
            'sign',
            'neg',
            'pow',
            'sqrt',
            'clamp',
            'vectorized',
            'elementwise',
            'reduce',
        ),
    ),
)


def family(name):
    lowered = name.lower()
    return next((f for f, keys in FAMILIES if any(k in lowered for k in keys)), 'other')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='swin_tiny', choices=list(speed.MODELS))
    parser.add_argument('--variant', default='eager', choices=list(speed.VARIANTS))
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--official-dir', default=None)
    parser.add_argument('--top', type=int, default=15)
    parser.add_argument('--out', default=None, help='markdown file (a .json is written beside)')
    parser.add_argument('--trace', default=None, help='Chrome trace file')
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    spec = {
        'model': args.model,
        'variant': args.variant,
        'device': args.device,
        'batch_size': args.batch_size,
        'threads': args.threads,
        'official_dir': os.path.abspath(args.official_dir) if args.official_dir else None,
    }
    step, _, cuda = speed.build_row(spec)
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    attr = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events)
    per_step_ms = total / 1000 / args.steps
    families = {}
    for e in events:
        families[family(e.key)] = families.get(family(e.key), 0) + getattr(e, attr)
    where = 'CUDA kernels' if cuda else 'CPU operators'
    lines = [
        f'Machine: {machine_description(args.device)}.',
        '',
        f'{args.model} {args.variant}, batch {args.batch_size}, {args.device}: '
        f'{per_step_ms:.1f} ms of {where} self time per step',
        '',
        '| family | ms/step | share |',
        '|---|---|---|',
    ]
    for name, value in sorted(families.items(), key=lambda kv: -kv[1]):
        lines.append(f'| {name} | {value / 1000 / args.steps:.1f} | {100 * value / total:.1f}% |')
    lines += ['', '| operator | calls/step | ms/step | share |', '|---|---|---|---|']
    for e in sorted(events, key=lambda e: -getattr(e, attr))[: args.top]:
        lines.append(
            f'| `{e.key[:70]}` | {e.count / args.steps:.0f} | '
            f'{getattr(e, attr) / 1000 / args.steps:.1f} | '
            f'{100 * getattr(e, attr) / total:.1f}% |'
        )
    write_report(
        lines,
        args.out,
        {
            'spec': spec,
            'per_step_ms': per_step_ms,
            'families_ms': {k: v / 1000 / args.steps for k, v in families.items()},
        },
    )


if __name__ == '__main__':
    main()
