"""Per-iteration learning-rate schedules (reference section 5.3).

    build_scheduler(config, optimizer, n_iter_per_epoch) -> LRScheduler
    check_scheduler_config(config)       TRAIN.LR_SCHEDULER and the warmup fit together
    scheduler.step_update(num_updates)   set every group's lr for update index num_updates
    scheduler.lr_at(num_updates)         the per-group lrs at that index (pure)
    scheduler.state_dict() / load_state_dict(state)

All lengths are in optimizer updates: num_steps = EPOCHS * n_iter, warmup_steps = WARMUP_EPOCHS *
n_iter, decay_steps = DECAY_EPOCHS * n_iter, milestones = [e * n_iter for e in MULTISTEPS]. The
training loop calls ``step_update(epoch * n_iter + idx)`` after each update, as the official loop
does, so update k runs at ``lr_at(k - 1)``; the constructor sets every group to ``lr_at(0)``.

Each group's peak is its lr when the scheduler is built (BASE_LR * lr_scale from optimizer.py).
Warmup is linear from WARMUP_LR to the peak over warmup_steps, then:
    cosine     MIN_LR + (peak - MIN_LR) * (1 + cos(pi * t / T)) / 2, then MIN_LR after T
    linear     linear from peak to peak * 0.01 at num_steps (official LinearLRScheduler)
    step       peak * DECAY_RATE ** (t // decay_steps)           (timm StepLRScheduler)
    multistep  peak * GAMMA ** (number of milestones <= t)       (official MultiStepLRScheduler)
For cosine, WARMUP_PREFIX False (SimMIM repo) times the decay from update 0 (T = num_steps) and
lets the warmup overwrite its start; True (Swin-Transformer repo) starts it after the warmup
(t -= warmup_steps, T = num_steps - warmup_steps). The other schedules ignore WARMUP_PREFIX, as in
both repos: the Swin-Transformer repo passes it to CosineLRScheduler only, and the StepLRScheduler
of the timm it pinned (0.4.12) has no warmup prefix, so step decays at absolute multiples of
decay_steps (timm >= 0.6 shifts it by the warmup by default; that is not what the repo ran).
Multistep milestones are absolute, and at t == milestone the lr is already decayed, as in the
official class.

Choices:
- WARMUP_LR and MIN_LR are the same for every group, not multiplied by 'lr_scale', and the group
  peak is not multiplied by 'lr_scale' again: the behaviour of timm 0.4.12, which the official
  code ran with and which produced the published numbers. (timm >= 0.6 multiplies by 'lr_scale'
  inside the scheduler, which with the official optimizer applies layer decay twice.)
- Written here rather than taken from timm because timm's MultiStepLRScheduler decays one update
  earlier than the official class and its update_groups multiplies by 'lr_scale'.
- The scheduler holds no state besides its settings (the lr is a pure function of the update
  index), so state_dict() stores the settings only to check them: load_state_dict() never changes
  the schedule and returns the settings that differ from the saved ones.
"""

import bisect
import math

import torch
from yacs.config import CfgNode

from utils.errors import require
from utils.registry import require_choice

SCHEDULES = ('cosine', 'linear', 'step', 'multistep')
LINEAR_END_FRACTION = 0.01  # linear schedule ends at peak * 0.01 (official lr_min_rate)


def _check_schedule_name(name):
    require_choice('TRAIN.LR_SCHEDULER.NAME', name, SCHEDULES, 'schedules')


def check_scheduler_config(config):
    """Raise ConfigError for a schedule TRAIN.LR_SCHEDULER and TRAIN.WARMUP_EPOCHS cannot give."""
    train, sched = config.TRAIN, config.TRAIN.LR_SCHEDULER
    _check_schedule_name(sched.NAME)
    # A warmup longer than the run is allowed (e.g. an official YAML with --opts TRAIN.EPOCHS 1).
    require(train.WARMUP_EPOCHS >= 0, 'TRAIN.WARMUP_EPOCHS must be >= 0.')
    if sched.NAME == 'multistep':
        require(
            all(train.WARMUP_EPOCHS <= e for e in sched.MULTISTEPS),
            f'TRAIN.LR_SCHEDULER.MULTISTEPS {list(sched.MULTISTEPS)} must not fall inside the '
            f'warmup (TRAIN.WARMUP_EPOCHS {train.WARMUP_EPOCHS}).',
        )


class LRScheduler:
    """The lr of every param group as a function of the update index (see the module docstring)."""

    def __init__(
        self,
        optimizer,
        schedule,
        num_steps,
        warmup_steps=0,
        warmup_lr=0.0,
        min_lr=0.0,
        warmup_prefix=False,
        decay_steps=0,
        decay_rate=0.1,
        milestones=(),
        gamma=0.1,
    ):
        _check_schedule_name(schedule)
        if schedule == 'step' and decay_steps <= 0:
            raise ValueError(
                f'The step schedule needs decay_steps > 0, got {decay_steps} '
                f'(TRAIN.LR_SCHEDULER.DECAY_EPOCHS x iterations per epoch).'
            )
        self.optimizer = optimizer
        self.settings = {
            'schedule': schedule,
            'num_steps': int(num_steps),
            'warmup_steps': int(warmup_steps),
            'warmup_lr': float(warmup_lr),
            'min_lr': float(min_lr),
            'warmup_prefix': bool(warmup_prefix),
            'decay_steps': int(decay_steps),
            'decay_rate': float(decay_rate),
            'milestones': sorted(int(m) for m in milestones),
            'gamma': float(gamma),
            'peak_lrs': [float(g['lr']) for g in optimizer.param_groups],
        }
        self.last_num_updates = 0
        self.step_update(0)

    # -- the schedule ---------------------------------------------------------------------------
    def _after_warmup(self, peak, t):
        s = self.settings
        name = s['schedule']
        if name == 'cosine':
            total = s['num_steps']
            if s['warmup_prefix']:
                t, total = t - s['warmup_steps'], total - s['warmup_steps']
            if total <= 0 or t >= total:
                return s['min_lr']
            return s['min_lr'] + 0.5 * (peak - s['min_lr']) * (1 + math.cos(math.pi * t / total))
        if name == 'linear':
            total = s['num_steps'] - s['warmup_steps']
            progress = min(1.0, (t - s['warmup_steps']) / total) if total > 0 else 1.0
            return peak - (peak - peak * LINEAR_END_FRACTION) * progress
        if name == 'step':
            return peak * s['decay_rate'] ** (t // s['decay_steps'])
        return peak * s['gamma'] ** bisect.bisect_right(s['milestones'], t)  # multistep

    def lr_at(self, num_updates):
        """The lr of every param group at update index `num_updates` (no side effects)."""
        s = self.settings
        t, warmup = num_updates, s['warmup_steps']
        if t < warmup:
            return [s['warmup_lr'] + t * (peak - s['warmup_lr']) / warmup for peak in s['peak_lrs']]
        return [self._after_warmup(peak, t) for peak in s['peak_lrs']]

    def step_update(self, num_updates):
        """Set every param group's lr to its value at update index `num_updates`."""
        self.last_num_updates = int(num_updates)
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(num_updates), strict=True):
            group['lr'] = lr

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self):
        return {'settings': dict(self.settings), 'last_num_updates': self.last_num_updates}

    def load_state_dict(self, state):
        """Compare a saved state with this scheduler and return the differences as readable lines
        (empty when the schedule is the same). The schedule itself is never changed: it comes from
        the config, so resuming with e.g. more epochs takes the new schedule. The lr is not set
        either; the next step_update does that."""
        saved = state.get('settings') if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            return [f'saved scheduler state is not from this scheduler (keys {keys}); ignored']
        return [
            f'{key}: saved {saved.get(key)!r}, now {value!r}'
            for key, value in self.settings.items()
            if saved.get(key) != value
        ]


def build_scheduler(
    config: CfgNode, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int
) -> LRScheduler:
    """The LRScheduler of TRAIN.LR_SCHEDULER for `optimizer` (call after build_optimizer, before
    loading an optimizer state, so the group lrs are still the peaks)."""
    train, sched = config.TRAIN, config.TRAIN.LR_SCHEDULER
    return LRScheduler(
        optimizer,
        sched.NAME,
        num_steps=int(train.EPOCHS * n_iter_per_epoch),
        warmup_steps=int(train.WARMUP_EPOCHS * n_iter_per_epoch),
        warmup_lr=train.WARMUP_LR,
        min_lr=train.MIN_LR,
        warmup_prefix=sched.WARMUP_PREFIX,
        decay_steps=int(sched.DECAY_EPOCHS * n_iter_per_epoch),
        decay_rate=sched.DECAY_RATE,
        milestones=[int(e * n_iter_per_epoch) for e in sched.MULTISTEPS],
        gamma=sched.GAMMA,
    )
