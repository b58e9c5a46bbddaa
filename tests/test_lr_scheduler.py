"""lr_scheduler.py: values at known update indices for every schedule (hand-computed)."""

import glob
import io
import math
import os

import pytest
import torch

from config import get_defaults, load_config
from lr_scheduler import build_scheduler
from tests.conftest import ROOT

N_ITER = 10  # updates per epoch: EPOCHS 10 -> 100 updates, WARMUP_EPOCHS 2 -> 20 updates


def make_config(name='cosine', warmup_prefix=False, train=(), schedule=()):
    """BASE_LR 1, WARMUP_LR 0.1, MIN_LR 0.01 over 10 epochs with 2 of warmup; `train` and
    `schedule` override TRAIN.* and TRAIN.LR_SCHEDULER.* keys."""
    config = get_defaults()
    config.TRAIN.EPOCHS = 10
    config.TRAIN.WARMUP_EPOCHS = 2
    config.TRAIN.BASE_LR = 1.0
    config.TRAIN.WARMUP_LR = 0.1
    config.TRAIN.MIN_LR = 0.01
    config.TRAIN.LR_SCHEDULER.NAME = name
    config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = warmup_prefix
    config.TRAIN.update(dict(train))
    config.TRAIN.LR_SCHEDULER.update(dict(schedule))
    return config


def make_optimizer(peaks=(1.0,)):
    """One group per peak lr, like optimizer.py's groups (lr = BASE_LR * lr_scale)."""
    groups = [
        {'params': [torch.nn.Parameter(torch.zeros(1))], 'lr': lr, 'lr_scale': lr} for lr in peaks
    ]
    return torch.optim.SGD(groups, lr=1.0)


def lrs(config, steps, peaks=(1.0,)):
    scheduler = build_scheduler(config, make_optimizer(peaks), N_ITER)
    return [scheduler.lr_at(t)[0] for t in steps]


def test_warmup_starts_at_warmup_lr_and_is_linear():
    config = make_config()
    scheduler = build_scheduler(config, make_optimizer(), N_ITER)
    assert scheduler.optimizer.param_groups[0]['lr'] == pytest.approx(0.1)  # set at construction
    assert scheduler.lr_at(0) == [pytest.approx(0.1)]
    assert scheduler.lr_at(10) == [pytest.approx(0.1 + 10 * 0.9 / 20)]  # 0.55
    assert scheduler.lr_at(19) == [pytest.approx(0.1 + 19 * 0.9 / 20)]


def test_no_warmup_starts_at_peak():
    config = make_config(train={'WARMUP_EPOCHS': 0})
    scheduler = build_scheduler(config, make_optimizer(), N_ITER)
    assert scheduler.optimizer.param_groups[0]['lr'] == pytest.approx(1.0)


def test_cosine_without_warmup_prefix_is_timed_from_update_0():
    # SimMIM repo: cosine over all 100 updates, the warmup overwrites its first 20.
    got = lrs(make_config('cosine', warmup_prefix=False), [20, 50, 100, 150])
    assert got[0] == pytest.approx(0.01 + 0.495 * (1 + math.cos(math.pi * 0.2)))  # 0.90546
    assert got[1] == pytest.approx(0.505)
    assert got[2:] == [pytest.approx(0.01)] * 2


def test_cosine_with_warmup_prefix_starts_at_peak_after_warmup():
    # Swin-Transformer repo: cosine over the 80 updates after the warmup.
    got = lrs(make_config('cosine', warmup_prefix=True), [20, 60, 100, 120])
    assert got == [pytest.approx(v) for v in (1.0, 0.505, 0.01, 0.01)]


def test_linear_decays_to_one_percent_of_peak():
    got = lrs(make_config('linear'), [20, 60, 100, 130])
    assert got == [pytest.approx(v) for v in (1.0, 1 - 0.99 * 40 / 80, 0.01, 0.01)]


@pytest.mark.parametrize('warmup_prefix', [False, True])
def test_step_decays_every_decay_epochs_counted_from_update_0(warmup_prefix):
    # timm 0.4.12's StepLRScheduler (what the Swin-Transformer repo pinned, and it passes
    # WARMUP_PREFIX to the cosine only): lr = peak * rate ** (t // decay_steps) after the warmup,
    # whatever WARMUP_PREFIX says.
    config = make_config('step', warmup_prefix, schedule={'DECAY_EPOCHS': 3, 'DECAY_RATE': 0.5})
    expected = {20: 1.0, 29: 1.0, 30: 0.5, 59: 0.5, 60: 0.25, 89: 0.25, 90: 0.125}
    got = lrs(config, list(expected))
    assert got == [pytest.approx(v) for v in expected.values()]


def test_step_decays_during_the_warmup_count_at_its_end():
    # Decay every 10 updates, warmup 20: the warmup ends at 1.0 * 0.5 ** (20 // 10) = 0.25, as
    # in timm 0.4.12 (a shifted schedule would be back at the peak 1.0).
    config = make_config('step', True, schedule={'DECAY_EPOCHS': 1, 'DECAY_RATE': 0.5})
    assert lrs(config, [19, 20, 29, 30]) == [
        pytest.approx(v) for v in (0.1 + 19 * 0.9 / 20, 0.25, 0.25, 0.125)
    ]


def test_multistep_is_already_decayed_at_the_milestone():
    # Official MultiStepLRScheduler: bisect_right, so at t == milestone the decay applies.
    config = make_config(
        'multistep', train={'MIN_LR': 0.05}, schedule={'MULTISTEPS': [5, 8], 'GAMMA': 0.1}
    )
    got = lrs(config, [20, 49, 50, 79, 80, 200])
    # MIN_LR (0.05) is ignored: the lr goes down to 0.01.
    assert got == [pytest.approx(v) for v in (1.0, 1.0, 0.1, 0.1, 0.01, 0.01)]


def test_warmup_and_min_lr_are_not_scaled_per_group():
    # Two groups with layer-decay peaks 1.0 and 0.25: the same WARMUP_LR start and MIN_LR end
    # (timm 0.4.12 behaviour); in between each group follows its own peak.
    config = make_config('cosine', warmup_prefix=True)
    scheduler = build_scheduler(config, make_optimizer((1.0, 0.25)), N_ITER)
    assert scheduler.lr_at(0) == [pytest.approx(0.1)] * 2
    assert scheduler.lr_at(20) == [pytest.approx(1.0), pytest.approx(0.25)]
    assert scheduler.lr_at(60) == [pytest.approx(0.505), pytest.approx(0.01 + 0.5 * 0.24)]
    assert scheduler.lr_at(100) == [pytest.approx(0.01)] * 2


def test_lr_at_is_pure_and_step_update_sets_every_group():
    scheduler = build_scheduler(make_config(), make_optimizer((1.0, 0.5)), N_ITER)
    groups = scheduler.optimizer.param_groups
    scheduler.lr_at(50)
    assert [g['lr'] for g in groups] == [pytest.approx(0.1)] * 2
    scheduler.step_update(50)
    assert [g['lr'] for g in groups] == [pytest.approx(v) for v in scheduler.lr_at(50)]


def test_state_dict_round_trip_is_harmless_and_reports_differences():
    config = make_config('multistep', schedule={'MULTISTEPS': [5]})
    scheduler = build_scheduler(config, make_optimizer(), N_ITER)
    scheduler.step_update(42)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)  # checkpoints are read with weights_only=True
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    same = build_scheduler(config, make_optimizer(), N_ITER)
    assert same.load_state_dict(saved) == []
    assert same.lr_at(60) == scheduler.lr_at(60)

    longer_config = make_config('multistep', train={'EPOCHS': 20}, schedule={'MULTISTEPS': [5]})
    longer = build_scheduler(longer_config, make_optimizer(), N_ITER)
    before = [longer.lr_at(t) for t in range(0, 200, 7)]
    differences = longer.load_state_dict(saved)
    assert len(differences) == 1 and differences[0].startswith('num_steps: saved 100, now 200')
    assert [longer.lr_at(t) for t in range(0, 200, 7)] == before  # the config's schedule wins

    # An official (timm) scheduler state is reported, not applied.
    foreign = {'t_initial': 100, 'warmup_t': 20, 'base_values': [1.0]}
    assert 'not from this scheduler' in longer.load_state_dict(foreign)[0]


SWIN_REPO_YAMLS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'simmim', '*.yaml')))


def test_swin_repo_yamls_use_that_repos_warmup_prefix_and_simmim_repo_yamls_do_not():
    assert len(SWIN_REPO_YAMLS) == 4
    for path in SWIN_REPO_YAMLS:
        assert load_config(path, is_pretrain='pretrain' in path).TRAIN.LR_SCHEDULER.WARMUP_PREFIX
    simmim_repo = glob.glob(os.path.join(ROOT, 'configs', '*__*ep', 'simmim_*.yaml'))
    assert simmim_repo
    for path in simmim_repo:
        config = load_config(path, is_pretrain='pretrain' in path)
        assert not config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX


def test_swinv2_finetune_yaml_reaches_the_peak_after_warmup_and_half_at_epoch_60():
    # Swin-Transformer repo recipe: 100 epochs, 20 of warmup, cosine from the peak after the
    # warmup to MIN_LR over the remaining 80: at epoch 60 the cosine is half way, so
    # lr = MIN + (peak - MIN) / 2, i.e. 0.5 + 0.5 * MIN / peak = 0.5 + 0.5 * 2.5e-7 / 1.25e-3
    # = 0.5001 of the peak (both scale with the batch alike).
    config = load_config(
        os.path.join(
            ROOT, 'configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml'
        ),
        is_pretrain=False,
    )
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS) == (100, 20)
    peak = config.TRAIN.BASE_LR
    scheduler = build_scheduler(config, make_optimizer((peak,)), N_ITER)

    def ratio(epoch):
        return scheduler.lr_at(epoch * N_ITER)[0] / peak

    assert ratio(20) == pytest.approx(1.0, abs=1e-12)
    assert ratio(60) == pytest.approx(0.5001, abs=1e-12)
    assert ratio(100) == pytest.approx(2.5e-7 / 1.25e-3, abs=1e-12)  # MIN_LR at the end
