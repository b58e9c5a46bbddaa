"""engine/memory_plan.py and tools/plan_memory.py: the estimate against the peak torch's own tensor
tracker measures for a real training step, and the planner's command line. Larger models and
FSDP are compared in benchmarks/memory_check.py (results in benchmarks/RESULTS.md)."""

import os
import re

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from config import load_config
from engine.memory_plan import (
    build_on_meta,
    estimate,
    largest_batch,
    measure_activations,
    model_stats,
)
from models import build_model
from optimizer import build_optimizer
from tests.conftest import ROOT
from tools import plan_memory

TINY_V2 = os.path.join(ROOT, 'tests', 'configs', 'tiny_swinv2_pretrain.yaml')
WIDER = ('MODEL.SWINV2.EMBED_DIM', '32', 'DATA.IMG_SIZE', '128', 'DATA.MASK_PATCH_SIZE', '32')


def measured_peak(config, batch):
    """Peak tensor bytes of the second training step (the first creates the AdamW state)."""
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    size, grid = config.DATA.IMG_SIZE, config.DATA.IMG_SIZE // model.patch_size
    images, mask = torch.randn(batch, 3, size, size), (torch.rand(batch, grid, grid) < 0.6).long()

    def step():
        model(images, mask).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 5.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer, images, mask)
    with tracker:
        step()
    return tracker.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']


@pytest.mark.parametrize('checkpointing', [False, True])
def test_estimate_is_within_20_percent_of_the_measured_peak(checkpointing):
    opts = [*WIDER, 'TRAIN.USE_CHECKPOINT', str(checkpointing)]
    config = load_config(TINY_V2, opts)
    activations = measure_activations(TINY_V2, WIDER, 'cpu', 'cpu', 'fp32')
    stats = model_stats(config)
    planned = estimate(stats, activations, 4, checkpointing=checkpointing, precision='fp32').peak
    measured = measured_peak(config, 4)
    # Activations are a good part of what is checked, not a rounding error beside the weights.
    assert estimate(stats, activations, 4, precision='fp32').activations > 0.3 * measured
    assert planned == pytest.approx(measured, rel=0.2)


def test_meta_build_counts_what_the_real_build_has():
    config = load_config(TINY_V2)
    real = build_model(config)
    stats = model_stats(config)
    assert stats.params == sum(p.numel() for p in real.parameters())
    assert stats.block_params == [
        sum(p.numel() for p in block.parameters())
        for layer in real.encoder.layers
        for block in layer.blocks
    ]
    assert all(p.is_meta for p in build_on_meta(config).parameters())


def test_largest_batch_is_the_last_that_fits():
    assert largest_batch(lambda b: b <= 37) == 37
    assert largest_batch(lambda b: False) == 0
    assert largest_batch(lambda b: True, limit=64) == 64


def test_sharding_divides_weights_and_optimizer_state_by_the_ranks():
    config = load_config(TINY_V2)
    stats, activations = model_stats(config), measure_activations(TINY_V2, (), 'cpu', 'cpu', 'fp32')
    ddp = estimate(stats, activations, 4, world_size=8, precision='fp32')
    fsdp = estimate(stats, activations, 4, world_size=8, sharding='fsdp', precision='fp32')
    assert ddp.optimizer == 8 * stats.params and fsdp.optimizer == stats.params
    assert ddp.other == 4 * stats.params  # DDP's gradient buckets
    assert fsdp.weights - stats.buffer_bytes == pytest.approx(4 * stats.params / 8)


def test_planner_prints_a_row_per_setting(capsys):
    assert (
        plan_memory.main(
            [
                '--cfg',
                TINY_V2,
                '--gpus',
                '2',
                '--gpu-memory',
                '1',
                '--precision',
                'fp32',
                '--device',
                'cpu',
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = [
        line for line in out.splitlines() if line.startswith('| ddp') or line.startswith('| fsdp')
    ]
    assert len(rows) == 4 and all(row.split('|')[-3].strip() == 'yes' for row in rows)


def test_planner_names_a_bad_config_key(capsys):
    assert plan_memory.main(['--cfg', TINY_V2, '--opts', 'TRAIN.SHARDINGG', 'fsdp']) == 2
    assert 'TRAIN.SHARDING' in capsys.readouterr().err


@pytest.mark.parametrize(
    'args, message',
    [
        (['--batch-size', '0'], '--batch-size must be >= 1'),
        (['--batch-size', '-4'], '--batch-size must be >= 1'),
        (['--gpu-memory', 'nan'], '--gpu-memory a finite number.*got nan'),
        (['--gpu-memory', 'inf'], '--gpu-memory a finite number.*got inf'),
        (['--gpu-memory', '0'], '--gpu-memory a finite number.*got 0'),
        (['--reserve', 'nan'], 'got nan'),
    ],
)
def test_planner_refuses_an_impossible_batch_or_memory(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        plan_memory.main(['--cfg', TINY_V2, '--device', 'cpu', *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and re.search(message, err), err


def test_planner_marks_a_largest_batch_at_the_search_cap_as_a_lower_bound(capsys):
    # 10^6 GiB per GPU hold far more than the 4096 images searched: the answer is a bound.
    argv = ['--cfg', TINY_V2, '--gpu-memory', '1e6', '--precision', 'fp32', '--device', 'cpu']
    assert plan_memory.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith(('| ddp', '| fsdp'))]
    assert len(rows) == 4 and all(row.split('|')[-2].strip() == '>= 4096' for row in rows), rows
