"""Measured peak memory of a SimMIM training step against the planner's estimate
(engine/memory_plan.py, tools/plan_memory.py), and images/s.

    python -m benchmarks.memory_check --device cpu --out benchmarks/memory_cpu.md      # this VM
    python -m benchmarks.memory_check --device cuda --out gpu_out/memory_gpu.md        # a GPU

One case = (config, batch per rank, sharding, activation checkpointing, ranks). Each case runs in
fresh processes (one per rank; gloo on the CPU, NCCL on a GPU): two training steps (forward,
backward, clipping, fused AdamW), the second measured. The peak is tensor memory: on a GPU
torch.cuda.max_memory_allocated; on the CPU torch's own tracker of live tensor storages
(torch.distributed._tools MemTracker / FSDPMemTracker), since the CPU allocator keeps no such count.
Under FSDP on one GPU the group has one rank: that measures FSDP's own overhead (gathered units,
bf16 copies), not the saving of sharding over N GPUs.
"""

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import load_config
from engine.memory_plan import GIB, estimate, measure_activations, model_stats
from engine.precision import autocast
from engine.sharding import shard_model
from models import build_model
from optimizer import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWINV2_B = 'configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml'
SWINV2_L = 'configs/swinv2_large__800ep/simmim_pretrain__swinv2_large__img192_window12__800ep.yaml'
SWINV2_H = 'configs/swinv2_huge__800ep/simmim_pretrain__swinv2_huge__img192_window12__800ep.yaml'
SWINV2_G = 'configs/swinv2_giant__800ep/simmim_pretrain__swinv2_giant__img192_window12__800ep.yaml'
VIT_B = 'configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml'
# SwinV2-B's layout at a quarter of its width: large enough that activations dominate, small
# enough for a 2-core CPU.
NARROW = ('MODEL.SWINV2.EMBED_DIM', '32', 'MODEL.SWINV2.NUM_HEADS', '[1,2,4,8]')
NARROW_VIT = ('MODEL.VIT.EMBED_DIM', '192', 'MODEL.VIT.NUM_HEADS', '3', 'MODEL.VIT.DEPTH', '6')
CPU_CASES = [  # (config, opts, batch, sharding, checkpointing, ranks)
    (SWINV2_B, NARROW, 4, 'ddp', False, 1),
    (SWINV2_B, NARROW, 4, 'ddp', True, 1),
    (SWINV2_B, NARROW, 4, 'fsdp', False, 2),
    (SWINV2_B, NARROW, 4, 'fsdp', True, 2),
    (VIT_B, NARROW_VIT, 4, 'ddp', False, 1),
]
GPU_CASES = [  # one GPU: 'ddp' is the plain model, 'fsdp' a group of one rank
    (SWINV2_B, (), 128, 'ddp', False, 1),
    (SWINV2_L, (), 128, 'ddp', False, 1),
    (SWINV2_L, (), 128, 'fsdp', False, 1),
    (SWINV2_L, (), 128, 'fsdp', True, 1),
    (SWINV2_H, (), 64, 'ddp', False, 1),
    (SWINV2_H, (), 64, 'fsdp', True, 1),
    (SWINV2_G, (), 32, 'ddp', True, 1),
    (SWINV2_G, (), 32, 'fsdp', True, 1),
]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _step(model, optimizer, images, mask, amp_dtype):
    with autocast(images.device, amp_dtype):
        loss = model(images, mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 5.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _measure_rank(rank, world_size, port, case, device_type, results, steps):
    cfg, opts, batch, sharding, checkpointing, _ = case
    device = torch.device('cuda', 0) if device_type == 'cuda' else torch.device('cpu')
    if sharding == 'fsdp':
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        dist.init_process_group(
            'nccl' if device_type == 'cuda' else 'gloo',
            rank=rank,
            world_size=world_size,
            device_id=device if device_type == 'cuda' else None,
        )
    config = load_config(
        os.path.join(ROOT, cfg), [*opts, 'TRAIN.USE_CHECKPOINT', str(checkpointing)]
    )
    amp_dtype = torch.bfloat16 if device_type == 'cuda' else None
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place: SwinV2-G has 3 B parameters
        model = build_model(config)
    if sharding == 'fsdp':
        shard_model(model, amp_dtype)
    optimizer = build_optimizer(config, model)
    size, grid = config.DATA.IMG_SIZE, config.DATA.IMG_SIZE // model.patch_size
    images = torch.randn(batch, model.in_chans, size, size, device=device)
    mask = (torch.rand(batch, grid, grid, device=device) < 0.6).long()
    _step(model, optimizer, images, mask, amp_dtype)  # creates the optimizer state
    if device_type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _step(model, optimizer, images, mask, amp_dtype)
        peak = torch.cuda.max_memory_allocated()
        start = time.perf_counter()
        for _ in range(steps):
            loss = _step(model, optimizer, images, mask, amp_dtype)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    else:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed._tools.mem_tracker import MemTracker

        if sharding == 'fsdp':
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((images, mask))
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer, images, mask)
        start = time.perf_counter()
        with tracker:
            loss = _step(model, optimizer, images, mask, amp_dtype)
        seconds = time.perf_counter() - start
        peak = tracker.get_tracker_snapshot('peak')[device]['Total']
    results[rank] = (peak, batch * world_size / seconds, loss.item())
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank, world_size, port, case, device_type, results, steps):
    _measure_rank(rank, world_size, port, case, device_type, results, steps)


def measure(case, device_type, steps=10):
    """(peak bytes of the most loaded rank, images/s over all ranks, rank 0's last loss)."""
    ranks = case[5]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(ranks, _free_port(), case, device_type, results, steps), nprocs=ranks)
    return (
        max(results[r][0] for r in range(ranks)),
        min(results[r][1] for r in range(ranks)),
        results[0][2],
    )


def planned(case, device_type, measure_device):
    cfg, opts, batch, sharding, checkpointing, ranks = case
    path = os.path.join(ROOT, cfg)
    precision = 'bf16' if device_type == 'cuda' else 'fp32'
    config = load_config(path, list(opts))
    activations = measure_activations(path, tuple(opts), measure_device, device_type, precision)
    return estimate(
        model_stats(config), activations, batch, ranks, sharding, checkpointing, precision
    ).peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--out', help='append the markdown table to this file')
    parser.add_argument('--cases', type=int, nargs='+', help='indices of the cases to run')
    args = parser.parse_args(argv)
    cases = CPU_CASES if args.device == 'cpu' else GPU_CASES
    chosen = [cases[i] for i in args.cases] if args.cases else cases
    lines = [
        '| config | batch/rank | sharding | act. ckpt | ranks | planned GiB | measured GiB | '
        'planned/measured | images/s | loss |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for case in chosen:
        cfg, opts, batch, sharding, checkpointing, ranks = case
        name = os.path.basename(cfg).replace('.yaml', '') + (' (narrow)' if opts else '')
        plan = planned(case, args.device, args.device)
        if args.device == 'cuda':
            torch.cuda.empty_cache()  # leave the card to the measuring processes
        try:
            peak, speed, loss = measure(case, args.device)
            speed = f'{speed:.1f}' if args.device == 'cuda' else '-'  # the CPU tracker slows it
            row = f'{peak / GIB:.3f} | {plan / peak:.2f} | {speed} | {loss:.4f}'
        except Exception as e:  # e.g. out of memory: report and go on
            row = f'failed: {type(e).__name__} | | |'
        lines.append(
            f'| {name} | {batch} | {sharding} | {checkpointing} | {ranks} | '
            f'{plan / GIB:.3f} | {row} |'
        )
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, 'a') as f:
            f.write('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
