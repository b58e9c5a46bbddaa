"""Validation accuracy (exact under distributed evaluation), forward throughput, and the weights
--eval evaluates.

    evaluate(model, data_loader, device, amp_dtype) -> (acc1, acc5, loss, num_images)
    throughput(model, data_loader, device, logger, amp_dtype) -> images/s
    load_eval_weights(config, model, logger) -> the checkpoint loaded for --eval
"""

import os
import time

import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from checkpoint.layout import BEST_CHECKPOINT
from checkpoint.resume import find_resume_checkpoint
from checkpoint.sharded import is_sharded_checkpoint, read_checkpoint
from checkpoint.weights import load_full_state_dict
from engine.precision import autocast
from engine.sharding import lockstep_extra_batches
from utils.distributed import all_reduce_sum
from utils.errors import CheckpointError


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    logger=None,
    print_freq: int = 10,
) -> tuple[float, float, float, int]:
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
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top5.eq(target[:, None])
        totals += torch.stack(
            [
                hits[:, :1].sum(),
                hits.sum(),
                F.cross_entropy(output, target, reduction='sum'),
                torch.tensor(target.shape[0], device=device),
            ]
        ).double()
        if logger is not None and idx % print_freq == 0:
            logger.info(f'Test: [{idx}/{len(data_loader)}]')
    if extra:  # FSDP: join the all-gathers of ranks with a longer shard; the outputs are unused
        image = data_loader.dataset[0][0].unsqueeze(0).to(device)
        with autocast(device, amp_dtype):
            for _ in range(extra):
                model(image)
    all_reduce_sum(totals)
    correct1, correct5, loss_sum, count = totals.tolist()
    count = max(count, 1)
    return 100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count, int(count)


@torch.no_grad()
def throughput(
    model: torch.nn.Module,
    data_loader,
    device: torch.device,
    logger,
    amp_dtype: torch.dtype | None = None,
    warmup: int = 50,
    timed: int = 30,
) -> float:
    """Images per second of the forward pass on one validation batch, as the official script:
    `warmup` untimed passes, then `timed` passes between two synchronisations (under the run's
    autocast dtype, if any)."""
    model.eval()
    images = next(iter(data_loader))[0].to(device, non_blocking=True)
    batch_size = images.shape[0]

    def forward_passes(count):
        with autocast(device, amp_dtype):
            for _ in range(count):
                model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    forward_passes(warmup)
    logger.info(f'throughput averaged with {timed} times')
    start = time.perf_counter()
    forward_passes(timed)
    images_per_sec = timed * batch_size / (time.perf_counter() - start)
    logger.info(f'batch_size {batch_size} throughput {images_per_sec:.1f} ({amp_dtype or "fp32"})')
    return images_per_sec


def load_eval_weights(config: CfgNode, model: torch.nn.Module, logger) -> dict:
    """--eval: load the model weights of MODEL.RESUME; without it, of OUTPUT/model_best.pth, else of
    the newest resumable checkpoint in OUTPUT (either layout). The file must hold every tensor of
    the model (checkpoint.weights.load_full_state_dict), so evaluation never runs on initial
    weights."""
    path, checkpoint = config.MODEL.RESUME, None
    if not path and os.path.isfile(os.path.join(config.OUTPUT, BEST_CHECKPOINT)):
        path = os.path.join(config.OUTPUT, BEST_CHECKPOINT)
    if not path:
        path, checkpoint = find_resume_checkpoint(config.OUTPUT, logger)
    if not path:
        raise CheckpointError(
            f'--eval needs a checkpoint: pass --resume CKPT (a fine-tuned '
            f'checkpoint of this framework or the official code); none was found '
            f'in {config.OUTPUT} ({BEST_CHECKPOINT} or ckpt_epoch_*.pth).'
        )
    if checkpoint is None or is_sharded_checkpoint(path):  # a sharded run's: read it whole
        checkpoint = read_checkpoint(path, '--resume', model_only=True)
    load_full_state_dict(model, checkpoint, f'The --eval checkpoint {path}')
    logger.info(f'loaded {path} for evaluation')
    return checkpoint
