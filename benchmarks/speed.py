"""Pre-training step speed, side by side: the official SimMIM model, ours eager, ours compiled.

    python -m benchmarks.speed --official-dir ../shared/reference/official_code/SimMIM   # GPU
    python -m benchmarks.speed --device cpu --official-dir DIR                          # CPU

Rows per model: `official` (microsoft/SimMIM built from the same YAML in its own process with its
folder first on sys.path: its attention, its AdamW parameter groups; on a GPU fp16 autocast with a
GradScaler, the stand-in for its apex O1, plus the per-step synchronisation and `loss.item()` of
its training loop), `eager` (ours: bf16 autocast on a GPU, fused AdamW with the on-device skip of
non-finite steps, no host sync), `blocks` / `model` (ours with TRAIN.COMPILE). On the CPU every
row is fp32. A step is forward, backward, gradient clipping at 5 and the optimizer step on random
images and masks (no data loading; see loader_speed.py for that).

Columns: images/s, ms/step (median over the timed steps), peak memory (GPU: max allocated; CPU:
peak RSS of the row's process), TFLOP/s achieved and MFU. FLOPs are counted once per model with
torch.utils.flop_counter.FlopCounterMode on a forward + backward of our model with the textbook
attention (matrix products only; the official model does the same arithmetic). MFU is against the
card's dense bf16/fp16 peak (H100/H200 SXM: 989 TFLOP/s); on a CPU it is not reported. Every row
runs in its own process, so memory peaks and compile caches do not leak between rows; the rows of
one model are alive together (they build and warm up, compilation included, at the same time) and
then take turns for `--rounds` rounds of timed steps, so load from elsewhere on a shared machine
hits them alike (ms/step is the median over all timed steps; warm-up is the wall time of the
`--warmup` first steps, with the other rows warming up alongside).
"""

import argparse
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import threading
import time

from benchmarks.report import machine_description, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWIN_B = 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'
VIT_B = 'configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml'
SWINV2_B = 'configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml'
# name: (YAML, --opts, official SimMIM has this architecture)
MODELS = {
    'swin_b': (SWIN_B, [], True),
    'vit_b': (VIT_B, [], True),
    'swinv2_b': (SWINV2_B, [], False),
    # CPU-sized stand-ins with the same structure (4 Swin stages: the official stride is 32;
    # ViT patch 16: the official decoder assumes it).
    'swin_tiny': (
        SWIN_B,
        [
            'MODEL.SWIN.EMBED_DIM',
            32,
            'MODEL.SWIN.DEPTHS',
            [2, 2, 2, 2],
            'MODEL.SWIN.NUM_HEADS',
            [1, 2, 4, 8],
        ],
        True,
    ),
    'vit_tiny': (
        VIT_B,
        ['MODEL.VIT.EMBED_DIM', 96, 'MODEL.VIT.DEPTH', 4, 'MODEL.VIT.NUM_HEADS', 4],
        True,
    ),
    'swinv2_tiny': (
        SWINV2_B,
        [
            'MODEL.SWINV2.EMBED_DIM',
            32,
            'MODEL.SWINV2.DEPTHS',
            [2, 2, 2, 2],
            'MODEL.SWINV2.NUM_HEADS',
            [1, 2, 4, 8],
        ],
        False,
    ),
}
VARIANTS = ('official', 'eager', 'blocks', 'model')
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}  # dense bf16 = fp16, SXM spec sheets
MASK_PATCH = 32
MASK_RATIO = 0.6


# -----------------------------------------------------------------------------------------------
# One row, in its own process
# -----------------------------------------------------------------------------------------------
def _official_model(official_dir, cfg, opts, batch_size):
    """The official SimMIM model and optimizer, imported from `official_dir` (the working folder
    of an official row's process, so first on its sys.path)."""
    import logging

    from config import _C, _update_config_from_file  # the official config.py
    from models import build_model
    from optimizer import build_optimizer

    config = _C.clone()
    _update_config_from_file(config, os.path.join(official_dir, cfg))
    config.defrost()
    config.merge_from_list(list(opts) + ['DATA.BATCH_SIZE', batch_size])
    config.freeze()
    model = build_model(config, is_pretrain=True)
    logger = logging.getLogger('official')
    return model, lambda m: build_optimizer(config, m, logger, is_pretrain=True), config


def _our_model(cfg, opts, batch_size):
    from config import load_config
    from models import build_model
    from optimizer import build_optimizer

    config = load_config(os.path.join(ROOT, cfg), list(opts) + ['DATA.BATCH_SIZE', batch_size])
    model = build_model(config, is_pretrain=True)
    return model, lambda m: build_optimizer(config, m, None, is_pretrain=True), config


def _inputs(batch_size, img_size, patch_size, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    grid = img_size // MASK_PATCH
    order = torch.rand(batch_size, grid * grid, generator=gen).argsort(dim=1)
    mask = (order < int(round(MASK_RATIO * grid * grid))).long().view(batch_size, grid, grid)
    scale = MASK_PATCH // patch_size
    mask = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return images.to(device), mask.to(device)


def build_row(spec):
    """The step function of one (model, variant), with the objects it measures."""
    import torch

    device = torch.device(spec['device'])
    cfg, opts, _ = MODELS[spec['model']]
    if spec['threads']:
        torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    official = spec['variant'] == 'official'
    if official:
        model, make_optimizer, config = _official_model(
            spec['official_dir'], cfg, opts, spec['batch_size']
        )
    else:
        model, make_optimizer, config = _our_model(cfg, opts, spec['batch_size'])
    from engine.precision import autocast  # imports only torch, so official rows can use it

    model = model.to(device)
    if spec['variant'] in ('blocks', 'model'):
        from engine.compilation import compile_model

        compile_model(model, spec['variant'])
    optimizer = make_optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == 'cuda'
    dtype = (torch.float16 if official else torch.bfloat16) if cuda else None
    scaler = torch.amp.GradScaler('cuda') if official and cuda else None
    images, mask = _inputs(spec['batch_size'], config.DATA.IMG_SIZE, model.patch_size, device)

    def step():
        with autocast(device, dtype):
            loss = model(images, mask)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 5.0, foreach=True)
            if not official:  # our loop: the non-finite skip happens inside the fused kernel
                optimizer.found_inf = (~torch.isfinite(norm)).float()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if official:  # the official loop synchronises and reads the loss every step
            if cuda:
                torch.cuda.synchronize()
            loss.item()
        return loss

    return step, params, cuda


def serve_row(spec):
    """Worker loop: build the row, then answer 'warmup N', 'time N' and 'stats' commands from stdin
    with one JSON line each, so the driver can interleave the rows of a model step by step."""
    import torch

    step, params, cuda = build_row(spec)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = None
    _reply({'ready': True})
    for line in sys.stdin:
        command, count = (line.split() + ['0'])[:2]
        count = int(count)
        if command == 'warmup':
            start = time.perf_counter()
            for _ in range(count):
                loss = step()
            sync()
            _reply({'warmup_s': time.perf_counter() - start})
        elif command == 'time':
            # CPU: each step on its own (ops are synchronous); GPU: the mean over `count` steps
            # between two synchronisations (our loop never synchronises per step).
            times = []
            start = time.perf_counter()
            for _ in range(count):
                loss = step()
                if not cuda:
                    times.append(time.perf_counter() - start)
                    start = time.perf_counter()
            sync()
            if cuda:
                times = [(time.perf_counter() - start) / count] * count
            _reply({'times': times})
        elif command == 'stats':
            peak = (
                torch.cuda.max_memory_allocated()
                if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            _reply(
                {
                    'peak_gib': peak / 2**30,
                    'loss': float(loss) if loss is not None else None,
                    'params': sum(p.numel() for p in params),
                }
            )
        else:
            return


def _reply(obj):
    print('REPLY ' + json.dumps(obj), flush=True)


def count_flops(model_name, batch_size):
    """FLOPs of one forward + backward of our model at `batch_size` (meta tensors, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from config import load_config
    from models import build_model
    from models.attention import eager_attention

    cfg, opts, _ = MODELS[model_name]
    config = load_config(os.path.join(ROOT, cfg), list(opts))
    with torch.device('meta'):
        model = build_model(config, is_pretrain=True)
    images, mask = _inputs(batch_size, config.DATA.IMG_SIZE, model.patch_size, 'meta')
    with eager_attention(), FlopCounterMode(display=False) as counter:
        model(images, mask).backward()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------------------------
# The driver
# -----------------------------------------------------------------------------------------------
def peak_tflops(device):
    import torch

    if device != 'cuda':
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class RowProcess:
    """One row's worker process; `ask` sends a command and waits for its JSON reply."""

    def __init__(self, spec):
        import tempfile

        self.stderr = tempfile.TemporaryFile(mode='w+')
        # An official row runs in the official folder, whose config/models/optimizer modules then
        # come first on its sys.path; this module is found through PYTHONPATH.
        official = spec['variant'] == 'official'
        env = {
            **os.environ,
            'PYTHONPATH': os.pathsep.join(
                [ROOT] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
            ),
        }
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'benchmarks.speed', '--worker', json.dumps(spec)],
            cwd=spec['official_dir'] if official else ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.replies = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith('REPLY '):
                self.replies.put(json.loads(line[len('REPLY ') :]))
        self.replies.put(None)

    def send(self, command):
        self.proc.stdin.write(command + '\n')
        self.proc.stdin.flush()

    def ask(self, command, timeout):
        """Send `command` (None: just wait) and return the reply, or raise RuntimeError."""
        if command is not None:
            self.send(command)
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f'timed out after {timeout:.0f} s') from None
        if reply is None:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-1:] or ['no output']
            raise RuntimeError(f'exit code {self.proc.returncode}: {tail[0][:300]}')
        return reply

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('quit\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def measure_model(rows, spec, args, deadline):
    """Start every row of one model at once, warm them up one after the other, then interleave
    their timed steps round by round, so that load from elsewhere hits all rows alike."""
    workers = {}
    for row in rows:
        workers[row['variant']] = RowProcess(dict(spec, variant=row['variant']))

    def ask(row, command, timeout=args.row_timeout):
        if 'error' in row:
            return None
        if deadline and time.time() > deadline:
            row['error'] = 'not run: --budget spent'
            return None
        try:
            return workers[row['variant']].ask(command, timeout)
        except RuntimeError as e:
            row['error'] = str(e)
            print(f'{row["model"]} {row["variant"]}: {e}', flush=True)
            return None

    try:
        for row in rows:
            ask(row, None)  # built (all rows build at once)
        # Warm-ups (compilation included) run at once too: not timed, and much shorter together.
        for row in rows:
            if 'error' not in row:
                workers[row['variant']].send(f'warmup {args.warmup}')
        for row in rows:
            reply = ask(row, None)
            if reply:
                row['warmup_s'] = reply['warmup_s']
        for _ in range(args.rounds):
            for row in rows:
                reply = ask(row, f'time {spec["steps"]}')
                if reply:
                    row.setdefault('times', []).extend(reply['times'])
        for row in rows:
            reply = ask(row, 'stats')
            if reply and row.get('times'):
                row.update(
                    reply,
                    ms_per_step=1000 * statistics.median(row['times']),
                    ms_per_step_min=1000 * min(row['times']),
                )
                print(
                    f'{row["model"]} {row["variant"]}: {row["ms_per_step"]:.1f} ms/step, '
                    f'{row["peak_gib"]:.2f} GiB',
                    flush=True,
                )
    finally:
        for worker in workers.values():
            worker.close()


def format_table(rows, peak):
    lines = [
        '| model | variant | precision | images/s | ms/step | peak memory (GiB) | TFLOP/s | MFU | '
        'images/s vs official | memory vs official | warm-up (s) |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r['model'] == row['model'] and r['variant'] == 'official' and 'ms_per_step' in r
            ),
            None,
        )
        if 'ms_per_step' not in row:
            lines.append(
                f'| {row["model"]} | {row["variant"]} | | {row.get("error", "")} | | | | | | | |'
            )
            continue
        ips = row['batch_size'] / row['ms_per_step'] * 1000
        tflops = row['flops'] / row['batch_size'] * ips / 1e12 if row.get('flops') else None
        mfu = f'{100 * tflops / peak:.1f}%' if tflops and peak else 'n/a'
        ratio = mem_ratio = ''
        if base is not None:
            ratio = f'{base["ms_per_step"] / row["ms_per_step"]:.2f}x'
            mem_ratio = f'{row["peak_gib"] / base["peak_gib"]:.2f}x'
        tflops_cell = f'{tflops:.3f}' if tflops is not None else ''
        lines.append(
            f'| {row["model"]} | {row["variant"]} | {row["precision"]} | {ips:.1f} | '
            f'{row["ms_per_step"]:.1f} | {row["peak_gib"]:.2f} | {tflops_cell} | {mfu} | '
            f'{ratio} | {mem_ratio} | {row["warmup_s"]:.0f} |'
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument(
        '--models',
        default=None,
        help=f'comma-separated, from {",".join(MODELS)} (default: the three base '
        f'models on a GPU; swin_tiny,vit_tiny,swinv2_tiny,swin_b on a CPU)',
    )
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument(
        '--batch-size',
        type=int,
        default=None,
        help='default 128 on a GPU, 8 for tiny models and 4 for base models on a CPU',
    )
    parser.add_argument(
        '--steps', type=int, default=None, help='timed steps per row and round (GPU 10, CPU 3)'
    )
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument(
        '--threads',
        type=int,
        default=0,
        help='torch threads per row (0: torch default); 1 steadies a shared CPU',
    )
    parser.add_argument(
        '--rounds',
        type=int,
        default=2,
        help='rounds of timed steps, the rows of a model taking turns',
    )
    parser.add_argument(
        '--official-dir',
        default=None,
        help='a checkout of microsoft/SimMIM (e.g. '
        '../shared/reference/official_code/SimMIM); without it no official rows',
    )
    parser.add_argument(
        '--row-timeout',
        type=float,
        default=900,
        help='seconds one command of a row (build, warm-up with compilation, a round) may take',
    )
    parser.add_argument(
        '--budget', type=float, default=0, help='seconds for all rows (0: no limit)'
    )
    parser.add_argument('--out', default=None, help='results file (.md; a .json is written beside)')
    args = parser.parse_args()
    if args.worker:
        serve_row(json.loads(args.worker))
        return
    import torch

    device = (
        args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    )
    models = (
        args.models
        or (
            'swin_b,vit_b,swinv2_b' if device == 'cuda' else 'swin_tiny,vit_tiny,swinv2_tiny,swin_b'
        )
    ).split(',')
    variants = args.variants.split(',')
    official_dir = os.path.abspath(args.official_dir) if args.official_dir else None
    start = time.time()
    rows, specs = [], []
    for name in models:
        wanted = [
            v for v in variants if v != 'official' or (official_dir is not None and MODELS[name][2])
        ]
        if not wanted:  # e.g. --variants official for a model the official code lacks
            continue
        batch = args.batch_size or (128 if device == 'cuda' else 8 if 'tiny' in name else 4)
        flops = count_flops(name, batch)
        model_rows = [
            {
                'model': name,
                'variant': variant,
                'batch_size': batch,
                'flops': flops,
                'precision': (
                    'fp16 autocast + GradScaler' if variant == 'official' else 'bf16 autocast'
                )
                if device == 'cuda'
                else 'fp32',
            }
            for variant in wanted
        ]
        rows += model_rows
        specs.append(
            (
                model_rows,
                {
                    'model': name,
                    'device': device,
                    'official_dir': official_dir,
                    'batch_size': batch,
                    'threads': args.threads,
                    'steps': args.steps or (10 if device == 'cuda' else 3),
                },
            )
        )
    deadline = start + args.budget if args.budget else None
    for model_rows, spec in specs:
        measure_model(model_rows, spec, args, deadline)
    machine = machine_description(device) + (
        f' ({args.threads} torch thread(s) per row)' if args.threads else ''
    )
    peak = peak_tflops(device)
    lines = [
        f'Machine: {machine}.',
        '',
        f'`python -m benchmarks.speed {" ".join(sys.argv[1:])}` ({args.rounds} round(s), '
        f'{time.time() - start:.0f} s). Peak: '
        + (
            f'{peak:.0f} TFLOP/s dense bf16/fp16.'
            if peak
            else 'MFU not reported (CPU or unknown card).'
        ),
        '',
    ]
    lines += format_table(rows, peak)
    write_report(
        lines,
        args.out,
        {'machine': machine, 'peak_tflops': peak, 'argv': sys.argv[1:], 'rows': rows},
    )


if __name__ == '__main__':
    main()
