"""The training loop, shared by pre-training and fine-tuning.

Pre-training and fine-tuning differ only in how a batch becomes a loss (`PretrainBatchLoss`,
`ClassificationBatchLoss` in utils/tasks.py); autocast, gradient accumulation, clipping, skipping of
non-finite steps, the schedule, logging, checkpoints and preemption live here once. The checkpoint
protocol between ranks is checkpoint/save.py, the device-side statistics and the log line
engine/train_stats.py.

No step forces a host-device sync: loss and gradient-norm statistics accumulate on the device and
are read every PRINT_FREQ steps, and a non-finite step is skipped inside the fused optimizer kernel
(its `found_inf` input) rather than by an `if` on the host.
"""
import datetime
import time

import torch

from config import amp_enabled
from lr_scheduler import build_scheduler
from optimizer import build_optimizer, supports_found_inf
from checkpoint.layout import (build_checkpoint, epoch_checkpoint_path, load_training_state,
                              progress_state, prune_step_checkpoints, step_checkpoint_path)
from checkpoint.save import (choose_resume_checkpoint, save_on_main_rank,
                                       save_sharded_on_every_rank)
from utils.distributed import all_reduce_max, broadcast_batchnorm_stats
from utils.errors import EXIT_NONFINITE, NonFiniteLossError, Preempted  # noqa: F401  (re-exported)
from engine.preemption import PreemptionHandler
from engine.run_folder import finished_message, record_config
from checkpoint.sharded import is_sharded_checkpoint, load_any_training_state, sharded_path
from engine.sharding import full_tensor, gradient_sync, is_fsdp, wrap_model
from utils.tasks import PRETRAIN
from engine.train_stats import (EpochStats, NonFiniteCounter, peak_memory_mb, progress_line,
                               write_train_scalars)


def autocast_dtype(config, device):
    """The autocast dtype for this run, or None for full precision (always None on the CPU)."""
    if device.type != 'cuda' or not amp_enabled(config):
        return None
    if config.AMP_DTYPE == 'auto':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, config.AMP_DTYPE)


def build_grad_scaler(dtype):
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler('cuda') if dtype == torch.float16 else None


def build_trainer(config, model, data_loader, batch_loss, logger, dist_info, writer=None,
                  task=PRETRAIN):
    """The optimizer, autocast dtype and GradScaler, DDP/FSDP wrapper and LR schedule for `model`
    (on its device already), assembled into a Trainer; `task` (utils.tasks) says whether layer
    decay applies."""
    logger.info(f'number of trainable params: '
                f'{sum(p.numel() for p in model.parameters() if p.requires_grad)}')
    amp_dtype = autocast_dtype(config, dist_info.device)
    logger.info(f'autocast: {amp_dtype or "off (fp32)"}')
    # FSDP replaces the parameters by their shards in place, so the optimizer comes after it.
    wrapped = wrap_model(config, model, dist_info, amp_dtype, logger)
    optimizer = build_optimizer(config, model, logger, task)
    lr_scheduler = build_scheduler(config, optimizer, len(data_loader))
    return Trainer(config, wrapped, model, optimizer, lr_scheduler, build_grad_scaler(amp_dtype),
                   data_loader, batch_loss, logger, dist_info, writer, amp_dtype)


class Trainer:
    """Runs epochs of `batch_loss` over `data_loader`, saving and resuming exactly.

    `model` may be DDP-wrapped; `model_without_ddp` is what gets saved. `after_epoch(epoch)` (e.g.
    validation) runs after each epoch and may update `self.max_accuracy` before the checkpoint.
    """

    def __init__(self, config, model, model_without_ddp, optimizer, lr_scheduler, scaler,
                 data_loader, batch_loss, logger, dist_info, writer=None, amp_dtype=None):
        self.config = config
        self.model = model
        self.model_without_ddp = model_without_ddp
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scaler = scaler
        self.data_loader = data_loader
        self.batch_loss = batch_loss
        self.logger = logger
        self.dist = dist_info
        self.device = dist_info.device
        self.writer = writer
        self.amp_dtype = amp_dtype
        self.accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
        self.max_accuracy = 0.0
        self.global_update = 0  # optimizer steps taken (skipped non-finite steps included)
        self.skipped_total = 0
        self.last_checkpoint = None
        self.sampler = data_loader.sampler
        self.sampler.set_epoch(0, start_index=0)
        self.steps_per_epoch = len(data_loader)
        self.params = [p for p in model_without_ddp.parameters() if p.requires_grad]
        self._skip_in_kernel = scaler is None and supports_found_inf(optimizer)
        self._nonfinite = NonFiniteCounter(self.device)
        self.preemption = PreemptionHandler()
        self.sharded_checkpoints = config.TRAIN.SHARDING == 'fsdp'  # DCP directories

    # ------------------------------------------------------------------ resume bookkeeping
    def train_state(self):
        return {'global_update': self.global_update, 'skipped_total': self.skipped_total}

    def load_train_state(self, state, max_accuracy):
        self.global_update = int(state.get('global_update', 0))
        self.skipped_total = int(state.get('skipped_total', 0))
        self.max_accuracy = float(max_accuracy)

    def resume(self):
        """Load the checkpoint to continue from (see choose_resume_checkpoint); return (epoch,
        step)."""
        config, logger = self.config, self.logger
        path, checkpoint = choose_resume_checkpoint(config, logger)
        if path is None:
            logger.info(f'no checkpoint found in {config.OUTPUT}, training from the start')
            return config.TRAIN.START_EPOCH, 0
        found_in = config.OUTPUT if path != config.MODEL.RESUME else None
        state = (self.model_without_ddp, self.optimizer, self.lr_scheduler, self.scaler, logger,
                 self.dist.rank, self.dist.world_size)
        if is_sharded_checkpoint(path) or is_fsdp(self.model):  # any layout, any world size
            epoch, step, max_accuracy, train_state = load_any_training_state(path, checkpoint, *state,
                                                                             config=config)
        else:
            epoch, step, max_accuracy, train_state = load_training_state(
                checkpoint, *state, config, path=path, found_in=found_in)
        self.load_train_state(train_state, max_accuracy)
        self.last_checkpoint = path
        logger.info(f'resumed from {path}: continuing at epoch {epoch}, step {step}')
        return epoch, step

    # ------------------------------------------------------------------ the loop
    def fit(self, start_epoch, start_step=0, after_epoch=None):
        """Train from (start_epoch, start_step) to TRAIN.EPOCHS, checkpointing as configured."""
        config = self.config
        if start_epoch >= config.TRAIN.EPOCHS:
            self.logger.info(finished_message(config, self.last_checkpoint))
            return
        if self.dist.is_main:
            record_config(config, self.logger)  # only now: this config is known to start
        self.preemption.install()
        try:
            start_time = time.time()
            for epoch in range(start_epoch, config.TRAIN.EPOCHS):
                self.train_epoch(epoch, start_step if epoch == start_epoch else 0)
                if after_epoch is not None:
                    after_epoch(epoch)
                if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                    self.save_checkpoint(epoch + 1, 0, epoch_checkpoint_path(config.OUTPUT, epoch))
            total = datetime.timedelta(seconds=int(time.time() - start_time))
            self.logger.info(f'Training time {total}')
        finally:
            self.preemption.uninstall()

    def train_epoch(self, epoch, start_step=0):
        config, device = self.config, self.device
        num_steps = self.steps_per_epoch
        self.model.train()
        self.sampler.set_epoch(epoch, start_index=start_step * config.DATA.BATCH_SIZE)
        self.optimizer.zero_grad(set_to_none=True)
        stats = EpochStats(device)
        epoch_start = window_start = time.perf_counter()
        data_time = 0.0
        window_steps = 0
        loss_since_update = torch.zeros((), device=device)
        data_iter = iter(self.data_loader)
        for idx in range(start_step, num_steps):
            fetch_start = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - fetch_start

            is_update = (idx + 1) % self.accumulation == 0
            with gradient_sync(self.model, enabled=is_update):
                with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss, batch_size = self.batch_loss(self.model, batch, device)
                scaled = loss / self.accumulation
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss = loss.detach().float()
            stats.add_loss(loss, batch_size)
            loss_since_update = loss_since_update + loss  # non-finite anywhere poisons the sum
            window_steps += 1

            if is_update:
                grad_norm, skipped = self._optimizer_step(loss_since_update)
                stats.add_update(grad_norm, skipped)
                loss_since_update = torch.zeros((), device=device)
                self.lr_scheduler.step_update(epoch * num_steps + idx)
                self.global_update += 1
                self._after_update(epoch, idx, stats)

            if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
                elapsed = time.perf_counter() - window_start
                self._log_progress(epoch, idx, num_steps, stats, elapsed, window_steps, data_time)
                window_start, data_time, window_steps = time.perf_counter(), 0.0, 0
        self.skipped_total += stats.skipped_in_epoch()
        broadcast_batchnorm_stats(self.model_without_ddp)  # every rank evaluates and saves the same
        took = datetime.timedelta(seconds=int(time.perf_counter() - epoch_start))
        self.logger.info(f'EPOCH {epoch} training takes {took}, loss avg '
                         f'{stats.read()["loss_avg"]:.4f}')
        bad_images = getattr(self.data_loader.dataset, 'unreadable_report', lambda: '')()
        if bad_images:
            self.logger.warning(f'EPOCH {epoch}: {bad_images}')

    def _optimizer_step(self, loss_since_update):
        """Clip, step unless non-finite, zero the gradients; return the pre-clip gradient norm and
        a 0/1 device flag telling whether the step was skipped."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.TRAIN.CLIP_GRAD
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params
                                                       if p.grad is not None], foreach=True)
        grad_norm = full_tensor(grad_norm)  # FSDP: the norm over all shards, as a plain tensor
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_since_update))
        bad = all_reduce_max(bad.to(torch.int32)).float()  # every rank skips the same steps
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # fp16: the scaler skips inf/NaN steps itself
            self.scaler.update()
        elif self._skip_in_kernel:
            self.optimizer.found_inf = bad.reshape(())
            self.optimizer.step()
        elif not bad.item():  # optimizers without the fused kernel (e.g. LARS) pay one sync
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite.update(bad, self.global_update)
        return grad_norm.detach().float(), bad.reshape(())

    def _after_update(self, epoch, idx, stats):
        config = self.config
        check_every = min(config.PRINT_FREQ, config.TRAIN.MAX_NONFINITE_STEPS)
        if self.global_update % check_every == 0:
            self._check_nonfinite(epoch)
        freq = config.CHECKPOINT.STEP_FREQ
        if freq and self.global_update % freq == 0:
            self.save_checkpoint(epoch, idx + 1, step_checkpoint_path(config.OUTPUT, epoch, idx + 1))
            if self.dist.is_main:
                prune_step_checkpoints(config.OUTPUT, config.CHECKPOINT.KEEP_STEP_CKPTS)
        if self.preemption.stop_requested():
            path = self.save_checkpoint(epoch, idx + 1,
                                        step_checkpoint_path(config.OUTPUT, epoch, idx + 1))
            raise Preempted(f"Stopped by {self.preemption.signal_name} after step {idx + 1} of "
                            f"epoch {epoch}; checkpoint written to {path}. Run the same command "
                            f"again (TRAIN.AUTO_RESUME) or pass --resume {path} to continue.")

    def _check_nonfinite(self, epoch):
        consecutive, streak_start = self._nonfinite.read()
        if consecutive >= self.config.TRAIN.MAX_NONFINITE_STEPS:
            last = self.last_checkpoint or 'none written yet'
            raise NonFiniteLossError(
                f"{consecutive} consecutive optimizer steps (since update {streak_start}, epoch "
                f"{epoch}) had a non-finite loss or gradient norm; each was skipped without touching "
                f"the parameters, and TRAIN.MAX_NONFINITE_STEPS is "
                f"{self.config.TRAIN.MAX_NONFINITE_STEPS}. Last good checkpoint: {last}. Usual "
                f"remedies: lower TRAIN.BASE_LR or lengthen TRAIN.WARMUP_EPOCHS, keep TRAIN.CLIP_GRAD "
                f"on, train in bfloat16 (AMP_DTYPE bfloat16) or fp32 (--disable-amp) instead of "
                f"float16, then resume from that checkpoint.")

    # ------------------------------------------------------------------ logging
    def _log_progress(self, epoch, idx, num_steps, stats, elapsed, window_steps, data_time):
        values = stats.read()  # the only host-device sync of the window
        self._check_nonfinite(epoch)
        config = self.config
        step_time = elapsed / max(window_steps, 1)
        stats.step_time_sum += elapsed
        stats.step_time_count += window_steps
        avg_time = stats.step_time_sum / max(stats.step_time_count, 1)
        lr = self.optimizer.param_groups[-1]['lr']
        images_per_sec = window_steps * config.DATA.BATCH_SIZE * self.dist.world_size / max(elapsed, 1e-9)
        data_fraction = data_time / max(elapsed, 1e-9)
        steps_left = (config.TRAIN.EPOCHS - epoch - 1) * num_steps + num_steps - idx - 1
        self.logger.info(progress_line(epoch, config.TRAIN.EPOCHS, idx, num_steps, values, lr,
                                       step_time, avg_time, data_fraction, images_per_sec,
                                       peak_memory_mb(self.device), steps_left))
        if self.writer is not None:
            write_train_scalars(self.writer, epoch * num_steps + idx, {
                'loss': values['loss'], 'lr': lr, 'grad_norm': values['grad_norm'],
                'images_per_sec': images_per_sec, 'data_wait_fraction': data_fraction,
                'skipped_steps': self.skipped_total + values['skipped']})

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, epoch, step, path):
        """Write the state for continuing at (epoch, step); return the path written (a directory
        under TRAIN.SHARDING fsdp). Called on every rank (see save_on_main_rank; under FSDP every
        rank writes its shards)."""
        if self.sharded_checkpoints:
            path = sharded_path(path)
            def make_progress(rng_states):
                return progress_state(self.config, self.lr_scheduler, self.scaler, (epoch, step),
                                      self.max_accuracy, rng_states, self.train_state())
            save_sharded_on_every_rank(path, self.model_without_ddp, self.optimizer, make_progress,
                                       self.dist, self.logger)
        else:
            def make_checkpoint(rng_states):
                return build_checkpoint(self.config, self.model_without_ddp, self.optimizer,
                                        self.lr_scheduler, self.scaler, (epoch, step),
                                        self.max_accuracy, rng_states, self.train_state())
            save_on_main_rank(path, make_checkpoint, self.dist, self.device, self.logger)
        self.last_checkpoint = path
        return path
