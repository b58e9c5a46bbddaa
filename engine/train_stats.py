"""Training statistics kept on the device, and the log line made from them
(the scalars go through engine/tracking.py).

The loop adds to these every step without reading them back; a log line (every PRINT_FREQ steps)
is the only host-device sync of its window.
"""

import datetime
import math
import resource
from typing import NamedTuple

import torch


class NonFiniteCounter:
    """Device-side count of consecutive skipped steps and where the streak started."""

    def __init__(self, device):
        self.consecutive = torch.zeros((), device=device)
        self.streak_start = torch.zeros((), device=device)

    def update(self, bad, update_index):
        bad = bad.reshape(())
        self.consecutive = (self.consecutive + bad) * bad
        starts = (bad > 0) & (self.consecutive == 1)
        self.streak_start = torch.where(
            starts, torch.full_like(self.streak_start, update_index), self.streak_start
        )

    def read(self):
        consecutive, start = torch.stack([self.consecutive, self.streak_start]).tolist()
        return int(consecutive), int(start)


class EpochStats:
    """Running loss / gradient-norm statistics kept on the device until a log line reads them."""

    def __init__(self, device):
        def zero():
            return torch.zeros((), device=device)

        self.loss_sum, self.loss_count, self.last_loss = zero(), zero(), zero()
        self.norm_sum, self.norm_count, self.last_norm = zero(), zero(), zero()
        self.skipped = zero()
        self.step_time_sum, self.step_time_count = 0.0, 0

    def add_loss(self, loss, batch_size):
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss * batch_size, 0.0)
        self.loss_count += finite * batch_size
        self.last_loss = loss

    def add_update(self, grad_norm, skipped):
        finite = torch.isfinite(grad_norm)
        self.norm_sum += torch.where(finite, grad_norm, 0.0)
        self.norm_count += finite
        self.skipped += skipped
        self.last_norm = grad_norm

    def read(self):
        values = torch.stack(
            [
                self.last_loss,
                self.loss_sum,
                self.loss_count,
                self.last_norm,
                self.norm_sum,
                self.norm_count,
                self.skipped,
            ]
        ).tolist()
        last_loss, loss_sum, loss_count, last_norm, norm_sum, norm_count, skipped = values
        return {
            'loss': last_loss,
            'loss_avg': loss_sum / loss_count if loss_count else math.nan,
            'grad_norm': last_norm,
            'grad_norm_avg': norm_sum / norm_count if norm_count else math.nan,
            'skipped': skipped,
        }

    def skipped_in_epoch(self):
        return int(self.skipped.item())


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS on Linux (KiB)


class WindowTiming(NamedTuple):
    """The timing of the steps since the last log line."""

    step_time: float  # seconds per step in the window
    avg_time: float  # seconds per step in the epoch so far
    data_fraction: float  # of the window's time spent waiting for data
    images_per_sec: float  # over all ranks


def progress_line(epoch, num_epochs, idx, num_steps, values, lr, timing, memory_mb, steps_left):
    """The official-style 'Train: [epoch/epochs][idx/steps] ...' log line, with the ETA of the
    epoch and of the whole run (`steps_left` training steps at the average step time)."""
    step_time, avg_time, data_fraction, images_per_sec = timing
    eta = datetime.timedelta(seconds=int(avg_time * (num_steps - idx - 1)))
    run_eta = datetime.timedelta(seconds=int(avg_time * steps_left))
    skipped = f'\tskipped {values["skipped"]:.0f}' if values['skipped'] else ''
    return (
        f'Train: [{epoch}/{num_epochs}][{idx}/{num_steps}]\t'
        f'eta {eta} (run {run_eta}) lr {lr:.6f}\t'
        f'time {step_time:.4f} ({avg_time:.4f})\t'
        f'loss {values["loss"]:.4f} ({values["loss_avg"]:.4f})\t'
        f'grad_norm {values["grad_norm"]:.4f} ({values["grad_norm_avg"]:.4f})\t'
        f'data {data_fraction:.0%}\t{images_per_sec:.1f} img/s\t'
        f'mem {memory_mb:.0f}MB{skipped}'
    )


def epoch_end_step(epoch, steps_per_epoch):
    """The global step of epoch `epoch`'s last training step: where per-epoch values (validation,
    reconstructions) go on the axis of the training scalars."""
    return (epoch + 1) * steps_per_epoch - 1
