"""Validation accuracy (exact under distributed evaluation) and forward throughput."""
import time

import torch
import torch.nn.functional as F

from utils.distributed import all_reduce_sum
from engine.sharding import lockstep_extra_batches


@torch.no_grad()
def evaluate(model, data_loader, device, amp_dtype=None, logger=None, print_freq=10):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole validation set.

    Each rank evaluates its own shard (no padded duplicates), and the sums of correct predictions,
    losses and sample counts are added over ranks, so every image counts exactly once.
    Returns (acc1, acc5, loss, num_images).
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count
    extra = lockstep_extra_batches(model, len(data_loader), device)
    for idx, (images, target) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top5.eq(target[:, None])
        totals += torch.stack([hits[:, :1].sum(), hits.sum(),
                               F.cross_entropy(output, target, reduction='sum'),
                               torch.tensor(target.shape[0], device=device)]).double()
        if logger is not None and idx % print_freq == 0:
            logger.info(f'Test: [{idx}/{len(data_loader)}]')
    if extra:  # FSDP: join the all-gathers of ranks with a longer shard; the outputs are unused
        image = data_loader.dataset[0][0].unsqueeze(0).to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            for _ in range(extra):
                model(image)
    all_reduce_sum(totals)
    correct1, correct5, loss_sum, count = totals.tolist()
    count = max(count, 1)
    return 100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count, int(count)


@torch.no_grad()
def throughput(model, data_loader, device, logger, amp_dtype=None, warmup=50, timed=30):
    """Images per second of the forward pass on one validation batch, as the official script:
    `warmup` untimed passes, then `timed` passes between two synchronisations (under the run's
    autocast dtype, if any)."""
    model.eval()
    images = next(iter(data_loader))[0].to(device, non_blocking=True)
    batch_size = images.shape[0]

    def forward_passes(count):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            for _ in range(count):
                model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    forward_passes(warmup)
    logger.info(f'throughput averaged with {timed} times')
    start = time.perf_counter()
    forward_passes(timed)
    images_per_sec = timed * batch_size / (time.perf_counter() - start)
    logger.info(f'batch_size {batch_size} throughput {images_per_sec:.1f} '
                f'({amp_dtype or "fp32"})')
    return images_per_sec
