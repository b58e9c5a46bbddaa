"""GPU checks the CPU cannot make: fused attention kernels, bf16 / fp16 training steps, the
on-device skip of non-finite steps, and training throughput of the official Swin-B / ViT-B models.

    python -m benchmarks.gpu_benchmark [--out results.md] [--steps 20] [--batch-size 128]

Writes a markdown report (card, torch version, numbers). Throughput is measured on random tensors
(model + optimizer only, no data loading); benchmarks/gpu_check.sh adds an end-to-end run.
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F

from config import load_config
from engine.precision import autocast
from models import build_model
from models.attention import attention, eager_attention
from optimizer import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWIN_B = 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'
VIT_B = 'configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml'
SWINV2_B = 'configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml'
DEVICE = 'cuda'  # --device cpu: a smoke test of this script on a machine without a GPU


def synchronize():
    if DEVICE == 'cuda':
        torch.cuda.synchronize()


def check_attention(lines):
    """Fused SDPA against the textbook formula on CUDA, with a Swin-like additive bias."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(64, 4, 36, 32, device=DEVICE) for _ in range(3))
    bias = torch.randn(1, 4, 36, 36, device=DEVICE).expand(64, -1, -1, -1).contiguous()
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    fused = attention(q, k, v, bias)
    with eager_attention():
        eager = attention(q, k, v, bias)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    lines.append(
        f'- fp32 SDPA vs textbook attention (64x4 windows of 36 tokens, additive bias): '
        f'max abs diff {(fused - eager).abs().max().item():.2e}'
    )
    for name, backend in (
        ('memory-efficient', torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION),
        ('cuDNN', torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
    ):
        try:
            with torch.nn.attention.sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(
                    q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=bias.bfloat16()
                )
            diff = (out.float() - eager).abs().max().item()
            lines.append(
                f'- bf16 {name} kernel accepts the additive bias: yes (max abs diff to fp32 '
                f'textbook {diff:.2e})'
            )
        except RuntimeError as e:
            lines.append(
                f'- bf16 {name} kernel accepts the additive bias: no '
                f'({str(e).splitlines()[0][:120]})'
            )


def check_nonfinite_skip(lines):
    """A NaN step leaves parameters and AdamW state untouched with the fused CUDA kernel."""
    p = torch.nn.Parameter(torch.ones(1000, device=DEVICE))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones_like(p)
    opt.found_inf = torch.zeros((), device=DEVICE)
    opt.step()
    before = p.detach().clone()
    step_before = opt.state[p]['step'].item()
    p.grad = torch.full_like(p, float('nan'))
    opt.found_inf = torch.ones((), device=DEVICE)
    opt.step()
    untouched = torch.equal(before, p.detach()) and opt.state[p]['step'].item() == step_before
    lines.append(
        f'- fused CUDA AdamW skips a step flagged by found_inf, parameters and state '
        f'untouched: {"yes" if untouched else "NO"}'
    )


def train_steps(cfg_path, batch_size, steps, dtype, eager, use_scaler=False, warmup=5):
    """(images/s, ms per step, peak GiB, last loss) of `steps` SimMIM training steps."""
    config = load_config(os.path.join(ROOT, cfg_path), ['DATA.BATCH_SIZE', batch_size])
    torch.manual_seed(0)
    model = build_model(config, is_pretrain=True).to(DEVICE)
    optimizer = build_optimizer(config, model, is_pretrain=True)
    scaler = torch.amp.GradScaler(DEVICE) if use_scaler else None
    size = config.DATA.IMG_SIZE
    patch = model.patch_size
    images = torch.randn(batch_size, 3, size, size, device=DEVICE)
    mask = (torch.rand(batch_size, size // patch, size // patch, device=DEVICE) < 0.6).long()
    if DEVICE == 'cuda':
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(DEVICE, None if dtype == torch.float32 else dtype):
            loss = model(images, mask)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    with eager_attention(eager, model=model):
        for _ in range(warmup):
            step()
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == 'cuda' else float('nan')
    model = optimizer = None  # free the memory before empty_cache (the closure holds them)
    if DEVICE == 'cuda':
        torch.cuda.empty_cache()
    return batch_size / seconds, seconds * 1000, peak, loss.item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default='gpu_results.md')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--device', default='cuda')
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        props = torch.cuda.get_device_properties(0)
        card = f'{props.name} ({props.total_memory / 2**30:.0f} GiB)'
    else:
        card = 'CPU (smoke test)'
    lines = [f'Card: {card}, torch {torch.__version__}, CUDA {torch.version.cuda}.', '']
    check_attention(lines)
    check_nonfinite_skip(lines)
    lines += [
        '',
        f'Training step of the SimMIM model (forward, backward, clip, fused AdamW), batch '
        f'{args.batch_size}, random data, mean of {args.steps} steps after 5 warm-up:',
        '',
        '| model | precision | attention | images/s | ms/step | peak memory (GiB) | loss |',
        '|---|---|---|---|---|---|---|',
    ]
    runs = [
        (SWIN_B, 'Swin-B 192', torch.bfloat16, False, False),
        (SWIN_B, 'Swin-B 192', torch.bfloat16, True, False),
        (SWIN_B, 'Swin-B 192', torch.float16, False, True),
        (SWIN_B, 'Swin-B 192', torch.float32, False, False),
        (VIT_B, 'ViT-B/16 224', torch.bfloat16, False, False),
        (VIT_B, 'ViT-B/16 224', torch.bfloat16, True, False),
        (SWINV2_B, 'SwinV2-B 192', torch.bfloat16, False, False),
    ]
    for cfg, name, dtype, eager, scaler in runs:
        ips, ms, peak, loss = train_steps(cfg, args.batch_size, args.steps, dtype, eager, scaler)
        precision = {
            torch.bfloat16: 'bf16 autocast',
            torch.float16: 'fp16 autocast + GradScaler',
            torch.float32: 'fp32 (TF32 matmuls)',
        }[dtype]
        lines.append(
            f'| {name} | {precision} | {"textbook" if eager else "SDPA"} | {ips:.0f} | '
            f'{ms:.1f} | {peak:.1f} | {loss:.4f} |'
        )
        print(lines[-1], flush=True)
    text = '\n'.join(lines) + '\n'
    print(text)
    with open(args.out, 'w') as f:
        f.write(text)


if __name__ == '__main__':
    main()
