"""utils/distributed.py with two gloo ranks: after an epoch of linear probing every rank holds the
same BatchNorm statistics (so every rank evaluates alike and model_best.pth is not one rank's),
under DDP and under FSDP (whose sharded parameters fused SGD does not take: it runs as foreach)."""

import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import load_config
from data import build_finetune_data
from engine.batch_loss import ClassificationBatchLoss
from engine.trainer import build_trainer
from models.linear_probe import build_linear_probe
from tests.conftest import ROOT
from utils.distributed import DistInfo
from utils.tasks import FINETUNE

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')


def _probe_one_epoch(rank, world_size, port, output, results, sharding, optimizer):
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    config = load_config(
        TINY,
        [
            'LINEAR_PROBE.ENABLE',
            'True',
            'TRAIN.OPTIMIZER.NAME',
            optimizer,
            'TRAIN.EPOCHS',
            '1',
            'TRAIN.WARMUP_EPOCHS',
            '0',
            'AUG.MIXUP',
            '0',
            'AUG.CUTMIX',
            '0',
            'DATA.SYNTHETIC.TRAIN_SIZE',
            '32',
            'TRAIN.SHARDING',
            sharding,
            'OUTPUT',
            output,
        ],
        task=FINETUNE,
    )
    data = build_finetune_data(config)
    config.defrost()
    config.MODEL.NUM_CLASSES = data.num_classes
    config.freeze()
    os.makedirs(config.OUTPUT, exist_ok=True)
    torch.manual_seed(0)  # the same initial model on both ranks
    model = build_linear_probe(config)
    trainer = build_trainer(
        config,
        model,
        data.train_loader,
        ClassificationBatchLoss(torch.nn.CrossEntropyLoss()),
        logging.getLogger(f'probe{rank}'),
        DistInfo(rank, world_size, 0, torch.device('cpu')),
        task=FINETUNE,
    )
    trainer.fit(0)
    results[rank] = {k: v.clone() for k, v in model.head[0].state_dict().items()}
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('sharding, optimizer', [('ddp', 'sgd'), ('fsdp', 'sgd'), ('fsdp', 'lars')])
def test_linear_probe_batchnorm_statistics_are_the_same_on_every_rank(
    tmp_path, sharding, optimizer
):
    results = mp.Manager().dict()
    mp.spawn(
        _probe_one_epoch,
        args=(2, _free_port(), str(tmp_path), results, sharding, optimizer),
        nprocs=2,
        join=True,
    )
    rank0, rank1 = results[0], results[1]
    assert set(rank0) == {'running_mean', 'running_var', 'num_batches_tracked'}
    assert int(rank0['num_batches_tracked']) == 2  # 32 images / 2 ranks / batch 8
    assert rank0['running_mean'].abs().sum() > 0  # the statistics were updated
    for key in rank0:  # each rank saw other images; the broadcast makes them one
        assert torch.equal(rank0[key], rank1[key]), key
