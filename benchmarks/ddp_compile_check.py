"""DDP with TRAIN.COMPILE: nothing recompiles after the first step.

    python -m benchmarks.ddp_compile_check --mode blocks --out ddp.md          # one rank
    torchrun --nproc_per_node 8 -m benchmarks.ddp_compile_check --mode model   # several

Builds the model of an official pre-training YAML (Swin-B by default), compiles it in place
(engine.compilation.compile_model) and wraps it in DDP (utils.distributed.wrap_ddp) as the training
scripts do, then runs forward, backward and AdamW steps under autocast (bf16 on a GPU), counting
dynamo's graphs after the first step and after the last. One rank is enough to exercise DDP's
hooks (the process group is created even for a single process).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from config import load_config
from engine.compilation import compile_model
from engine.precision import autocast
from models import build_model
from utils.distributed import wrap_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWIN_B = 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cfg', default=SWIN_B)
    parser.add_argument('--mode', default='blocks', choices=['blocks', 'model'])
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--batch-size', type=int, default=None, help='GPU 128, CPU 2')
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--use-checkpoint', action='store_true')
    parser.add_argument('--opts', nargs='*', default=[])
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    for key, value in (
        ('MASTER_ADDR', '127.0.0.1'),
        ('MASTER_PORT', '29511'),
        ('RANK', '0'),
        ('WORLD_SIZE', '1'),
        ('LOCAL_RANK', '0'),
    ):
        os.environ.setdefault(key, value)
    rank = int(os.environ['RANK'])
    if cuda:
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    device = torch.device('cuda', torch.cuda.current_device()) if cuda else torch.device('cpu')
    dist.init_process_group('nccl' if cuda else 'gloo')
    batch = args.batch_size or (128 if cuda else 2)
    opts = list(args.opts) + ['DATA.BATCH_SIZE', batch]
    if args.use_checkpoint:
        opts += ['TRAIN.USE_CHECKPOINT', True]
    config = load_config(os.path.join(ROOT, args.cfg), opts)
    torch.manual_seed(0)
    model = build_model(config, is_pretrain=True).to(device)
    compile_model(model, args.mode, backend=args.backend)
    ddp = wrap_ddp(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    size, patch = config.DATA.IMG_SIZE, model.patch_size
    images = torch.randn(batch, 3, size, size, device=device)
    mask = (torch.rand(batch, size // patch, size // patch, device=device) < 0.6).long()
    dtype = torch.bfloat16 if cuda else None
    graphs, start = [], time.perf_counter()
    for _ in range(args.steps):
        with autocast(device, dtype):
            loss = ddp(images, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        graphs.append(counters['stats']['unique_graphs'])
    if cuda:
        torch.cuda.synchronize()
    ok = graphs[0] > 0 and graphs[-1] == graphs[0]
    line = (
        f'DDP ({dist.get_world_size()} rank(s), {dist.get_backend()}) + TRAIN.COMPILE '
        f'{args.mode}{" + USE_CHECKPOINT" if args.use_checkpoint else ""}, {args.cfg}, batch '
        f'{batch}: {graphs[0]} graphs after the first step, {graphs[-1]} after {args.steps} '
        f'({time.perf_counter() - start:.0f} s, loss {loss.item():.4f}): '
        f'{"no recompilation" if ok else "RECOMPILED"}; recompile reasons: '
        f'{dict(counters["recompiles"]) or "none"}'
    )
    if rank == 0:
        print(line, flush=True)
        if args.out:
            with open(args.out, 'a') as f:
                f.write('- ' + line + '\n')
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
