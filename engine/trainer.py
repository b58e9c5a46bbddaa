"""The training loop, shared by pre-training and fine-tuning.

    build_trainer(config, model, data_loader, batch_loss, logger, dist_info, ...) -> Trainer
    trainer.fit(after_epoch=callback)

The two tasks differ only in how a batch becomes a loss (engine/batch_loss.py); autocast, gradient
accumulation, clipping, skipping of non-finite steps, the schedule and logging live here once.
When to save is engine/checkpoint_policy.py; the statistics and the log line engine/train_stats.py.
No step forces a host-device sync (docs/speed.md).
"""

import datetime
import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from checkpoint.layout import TrainingState, recorded_samples
from checkpoint.resume import choose_resume_checkpoint, resume_training
from checkpoint.weights import load_pretrained
from data.shards import source_fingerprint
from engine.checkpoint_policy import CheckpointPolicy
from engine.precision import autocast, autocast_dtype, build_grad_scaler, describe_autocast
from engine.run_folder import finished_message, record_config
from engine.sharding import full_tensor, gradient_sync, wrap_model
from engine.train_stats import (
    EpochStats,
    NonFiniteCounter,
    WindowTiming,
    peak_memory_mb,
    progress_line,
)
from lr_scheduler import build_scheduler
from optimizer import build_optimizer, supports_found_inf
from utils.distributed import DistInfo, all_reduce_max, broadcast_batchnorm_stats
from utils.errors import NonFiniteLossError
from utils.tasks import PRETRAIN, Task


def build_trainer(
    config: CfgNode,
    model: nn.Module,
    data_loader: DataLoader,
    batch_loss: Callable,
    logger: logging.Logger,
    dist_info: DistInfo,
    writer=None,
    task: Task = PRETRAIN,
    pretrained: nn.Module | None = None,
) -> 'Trainer':
    """A Trainer for `model` (on its device already, compiled if asked), resumed from the
    checkpoint to continue from if there is one: the autocast dtype and GradScaler, the DDP/FSDP
    wrapper, the optimizer (`task`, a utils.tasks.Task, says whether layer decay applies) and the
    LR schedule.

    MODEL.PRETRAINED is loaded into the module `pretrained` (the encoder in pre-training, the
    backbone in fine-tuning) only when no checkpoint continues the run, and before FSDP shards
    the model: a resume replaces those weights, and a sharded model cannot take a whole file.
    """
    logger.info(
        f'number of trainable params: '
        f'{sum(p.numel() for p in model.parameters() if p.requires_grad)}'
    )
    amp_dtype = autocast_dtype(config, dist_info.device)
    logger.info(f'autocast: {describe_autocast(config, dist_info.device, amp_dtype)}')
    path, checkpoint = choose_resume_checkpoint(config, logger, dist_info.is_main)
    if path is None and config.MODEL.PRETRAINED and pretrained is not None:
        load_pretrained(config, pretrained, logger)
    elif config.MODEL.PRETRAINED and pretrained is not None:
        logger.info(f'MODEL.PRETRAINED is not loaded: {path} continues this run, weights included')
    # FSDP replaces the parameters by their shards in place, so the optimizer comes after it.
    wrapped = wrap_model(config, model, dist_info, amp_dtype, logger)
    optimizer = build_optimizer(config, model, logger, task)
    state = TrainingState(
        model,
        optimizer,
        build_scheduler(config, optimizer, len(data_loader)),
        build_grad_scaler(amp_dtype),
        data_fingerprint=source_fingerprint(data_loader.dataset),
    )
    trainer = Trainer(
        config, wrapped, state, data_loader, batch_loss, logger, dist_info, writer, amp_dtype
    )
    trainer.resume(path, checkpoint)
    return trainer


class Trainer:
    """Runs epochs of `batch_loss` over `data_loader`, saving and resuming exactly.

    `wrapped_model` is what the loop calls (the DDP wrapper under DDP, else the model itself);
    `state.model` is the model (sharded in place under FSDP), which checkpoints save.
    `after_epoch(epoch)` (e.g. validation) runs after each epoch and may raise
    `state.max_accuracy` before the epoch checkpoint.
    """

    def __init__(
        self,
        config,
        wrapped_model,
        state,
        data_loader,
        batch_loss,
        logger,
        dist_info,
        writer=None,
        amp_dtype=None,
    ):
        self.config = config
        self.wrapped_model = wrapped_model
        self.state = state
        self.data_loader = data_loader
        self.batch_loss = batch_loss
        self.logger = logger
        self.dist_info = dist_info
        self.device = dist_info.device
        self.writer = writer
        self.amp_dtype = amp_dtype
        self.accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
        self.sampler = data_loader.sampler
        self.sampler.set_epoch(0, start_index=0)
        self.steps_per_epoch = len(data_loader)
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        self._skip_in_kernel = state.scaler is None and supports_found_inf(state.optimizer)
        self._nonfinite = NonFiniteCounter(self.device)
        self.checkpoints = CheckpointPolicy(config, state, dist_info, logger)
        self.start = (config.TRAIN.START_EPOCH, 0)  # (epoch, step) where fit() begins
        self.start_sample = 0  # the samples of that epoch trained already, over all ranks
        self.samples_per_step = config.DATA.BATCH_SIZE * dist_info.world_size
        self.updates_this_run = 0

    def resume(self, path, checkpoint):
        """Continue from `path` (what choose_resume_checkpoint found; None: from the start)."""
        config, logger = self.config, self.logger
        if path is None:
            logger.info(f'no checkpoint found in {config.OUTPUT}, training from the start')
            return
        found_in = config.OUTPUT if path != config.MODEL.RESUME else None
        self.start = resume_training(
            path,
            checkpoint,
            self.state,
            config,
            logger,
            self.dist_info.rank,
            self.dist_info.world_size,
            found_in,
        )
        self.checkpoints.last_checkpoint = path
        # The position in global samples (any world size wrote it): the step of this world size
        # that contains it, and the sampler starts exactly after it.
        samples = recorded_samples(checkpoint)
        if samples is not None:
            self.start = (self.start[0], samples // self.samples_per_step)
        self.start_sample = (
            samples if samples is not None else self.start[1] * self.samples_per_step
        )
        logger.info(
            f'resumed from {path}: continuing at epoch {self.start[0]}, step {self.start[1]} '
            f"({self.start_sample} of the epoch's samples trained)"
        )

    # ------------------------------------------------------------------ the loop
    def fit(self, start_epoch=None, start_step=None, after_epoch=None):
        """Train from (start_epoch, start_step) (default: where the resume left off) to
        TRAIN.EPOCHS, checkpointing as configured."""
        config = self.config
        start_epoch = self.start[0] if start_epoch is None else start_epoch
        start_step = (
            (self.start[1] if start_epoch == self.start[0] else 0)
            if start_step is None
            else start_step
        )
        if start_epoch >= config.TRAIN.EPOCHS:
            self.logger.info(finished_message(config, self.checkpoints.last_checkpoint))
            return
        if self.dist_info.is_main:
            record_config(config, self.logger)  # only now: this config is known to start
        resumed_here = (start_epoch, start_step) == self.start
        with self.checkpoints.stop_signals_caught():
            start_time = time.time()
            for epoch in range(start_epoch, config.TRAIN.EPOCHS):
                first = epoch == start_epoch  # a resume's position is in samples (any world size)
                sample = self.start_sample if first and resumed_here else None
                self.train_epoch(epoch, start_step if first else 0, sample)
                self._check_nonfinite(epoch, run_ended=epoch == config.TRAIN.EPOCHS - 1)
                if after_epoch is not None:
                    after_epoch(epoch)
                self.checkpoints.after_epoch(epoch)
            total = datetime.timedelta(seconds=int(time.time() - start_time))
            self.logger.info(f'Training time {total}')

    def train_epoch(self, epoch, start_step=0, start_sample=None):
        """One epoch from batch `start_step` on, the sampler skipping the `start_sample` samples
        (over all ranks; default: start_step's) a resumed run trained already."""
        config, device, state = self.config, self.device, self.state
        num_steps = self.steps_per_epoch
        if start_sample is None:
            start_sample = start_step * self.samples_per_step
        self.wrapped_model.train()
        self.sampler.set_epoch(epoch, start_sample=start_sample)
        last_step = start_step + len(self.data_loader) - 1  # misaligned resumes end early
        state.optimizer.zero_grad(set_to_none=True)
        stats = EpochStats(device)
        epoch_start = window_start = time.perf_counter()
        data_time = 0.0
        window_steps = 0
        loss_since_update = torch.zeros((), device=device)
        data_iter = iter(self.data_loader)
        for idx in range(start_step, last_step + 1):
            fetch_start = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - fetch_start

            is_update = (idx + 1) % self.accumulation == 0
            with gradient_sync(self.wrapped_model, enabled=is_update):
                with autocast(device, self.amp_dtype):
                    loss, batch_size = self.batch_loss(self.wrapped_model, batch, device)
                scaled = loss / self.accumulation
                (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
            loss = loss.detach().float()
            stats.add_loss(loss, batch_size)
            loss_since_update = loss_since_update + loss  # non-finite anywhere poisons the sum
            window_steps += 1

            if is_update:
                grad_norm, skipped = self._optimizer_step(loss_since_update)
                stats.add_update(grad_norm, skipped)
                loss_since_update = torch.zeros((), device=device)
                state.lr_scheduler.step_update(epoch * num_steps + idx)
                state.global_update += 1
                self.updates_this_run += 1
                check_every = min(config.PRINT_FREQ, config.TRAIN.MAX_NONFINITE_STEPS)
                if state.global_update % check_every == 0:
                    self._check_nonfinite(epoch)
                samples = start_sample + (idx + 1 - start_step) * self.samples_per_step
                self.checkpoints.after_update(epoch, idx + 1, samples)

            if idx % config.PRINT_FREQ == 0 or idx == last_step:
                elapsed = time.perf_counter() - window_start
                self._log_progress(epoch, idx, num_steps, stats, elapsed, window_steps, data_time)
                window_start, data_time, window_steps = time.perf_counter(), 0.0, 0
        state.skipped_total += stats.skipped_in_epoch()
        broadcast_batchnorm_stats(state.model)  # every rank evaluates and saves the same
        took = datetime.timedelta(seconds=int(time.perf_counter() - epoch_start))
        covered = (
            f' (steps {start_step}-{last_step}: this epoch since the resume)' if start_step else ''
        )
        loss_avg = stats.read()['loss_avg']
        self.logger.info(f'EPOCH {epoch} training takes {took}, loss avg {loss_avg:.4f}{covered}')
        if self.writer is not None:
            self.writer.log('epoch', last_step + epoch * num_steps, epoch, {'loss_avg': loss_avg})
        bad_images = getattr(self.data_loader.dataset, 'unreadable_report', lambda: '')()
        if bad_images:
            self.logger.warning(f'EPOCH {epoch}: {bad_images}')

    def _optimizer_step(self, loss_since_update):
        """Clip, step unless non-finite, zero the gradients; return the pre-clip gradient norm and
        a 0/1 device flag telling whether the step was skipped."""
        if self.state.scaler is not None:
            self.state.scaler.unscale_(self.state.optimizer)
        clip = self.config.TRAIN.CLIP_GRAD
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None], foreach=True
            )
        grad_norm = full_tensor(grad_norm)  # FSDP: the norm over all shards, as a plain tensor
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_since_update))
        bad = all_reduce_max(bad.to(torch.int32)).float()  # every rank skips the same steps
        if self.state.scaler is not None:
            self.state.scaler.step(
                self.state.optimizer
            )  # fp16: the scaler skips inf/NaN steps itself
            self.state.scaler.update()
        elif self._skip_in_kernel:
            self.state.optimizer.found_inf = bad.reshape(())
            self.state.optimizer.step()
        elif not bad.item():  # optimizers without the fused kernel (e.g. LARS) pay one sync
            self.state.optimizer.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        self._nonfinite.update(bad, self.state.global_update)
        return grad_norm.detach().float(), bad.reshape(())

    def _check_nonfinite(self, epoch, run_ended=False):
        """Raise NonFiniteLossError after TRAIN.MAX_NONFINITE_STEPS consecutive skipped steps (the
        streak runs on across epochs); when the run has ended, also after a shorter run whose every
        step was skipped, so no run ends well with a last window that trained nothing."""
        consecutive, streak_start = self._nonfinite.read()
        window = self.config.TRAIN.MAX_NONFINITE_STEPS
        if run_ended:
            window = min(window, self.updates_this_run)
        if consecutive and consecutive >= window:
            last = self.checkpoints.last_checkpoint or 'none written yet'
            raise NonFiniteLossError(
                f'{consecutive} consecutive optimizer steps (since update {streak_start}, epoch '
                f'{epoch}) had a non-finite loss or gradient norm; each was skipped without '
                f'touching the parameters, and TRAIN.MAX_NONFINITE_STEPS is '
                f'{self.config.TRAIN.MAX_NONFINITE_STEPS}. Last good checkpoint: {last}. Usual '
                'remedies: lower TRAIN.BASE_LR or lengthen TRAIN.WARMUP_EPOCHS, keep '
                'TRAIN.CLIP_GRAD on, train in bfloat16 (AMP_DTYPE bfloat16) or fp32 '
                '(--disable-amp) instead of float16, then resume from that checkpoint.'
            )

    # ------------------------------------------------------------------ logging
    def _log_progress(self, epoch, idx, num_steps, stats, elapsed, window_steps, data_time):
        values = stats.read()  # the only host-device sync of the window
        self._check_nonfinite(epoch)
        config = self.config
        step_time = elapsed / max(window_steps, 1)
        stats.step_time_sum += elapsed
        stats.step_time_count += window_steps
        avg_time = stats.step_time_sum / max(stats.step_time_count, 1)
        lr = self.state.optimizer.param_groups[-1]['lr']
        images_per_sec = (
            window_steps * config.DATA.BATCH_SIZE * self.dist_info.world_size / max(elapsed, 1e-9)
        )
        data_fraction = data_time / max(elapsed, 1e-9)
        steps_left = (config.TRAIN.EPOCHS - epoch - 1) * num_steps + num_steps - idx - 1
        timing = WindowTiming(step_time, avg_time, data_fraction, images_per_sec)
        memory = peak_memory_mb(self.device)
        line = progress_line(
            epoch, config.TRAIN.EPOCHS, idx, num_steps, values, lr, timing, memory, steps_left
        )
        self.logger.info(line)
        if self.writer is not None:
            self.writer.log(
                'train',
                epoch * num_steps + idx,
                epoch,
                {
                    'update': self.state.global_update,
                    'loss': values['loss'],
                    'lr': lr,
                    'grad_norm': values['grad_norm'],
                    'images_per_sec': images_per_sec,
                    'data_wait_fraction': data_fraction,
                    'skipped_steps': self.state.skipped_total + values['skipped'],
                },
            )
