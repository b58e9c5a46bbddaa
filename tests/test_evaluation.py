"""engine/evaluation.py: accuracy is exact under distributed evaluation with an uneven split."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.sampler import EvalDistributedSampler
from engine.evaluation import evaluate

NUM_SAMPLES, NUM_CLASSES = 7, 10  # 7 images over 2 ranks: shards of 4 and 3


class _Dataset(torch.utils.data.Dataset):
    """Sample i is its own logits (the model is the identity): class i first, then the other
    classes by ascending index, so its top-5 is {i} and the four smallest other classes. Labels
    make samples 0, 2, 4, 6 correct at top-1, samples 1 and 3 at top-5 only, sample 5 wrong."""

    def __len__(self):
        return NUM_SAMPLES

    def __getitem__(self, i):
        logits = -torch.arange(NUM_CLASSES, dtype=torch.float)
        logits[i] = 100.0
        label = {1: 0, 3: 2, 5: 9}.get(i, i)
        return logits, label


def _expected():
    return 100.0 * 4 / NUM_SAMPLES, 100.0 * 6 / NUM_SAMPLES  # counted by hand from the labels


def _evaluate(rank, world_size):
    loader = torch.utils.data.DataLoader(
        _Dataset(), batch_size=2, sampler=EvalDistributedSampler(NUM_SAMPLES, world_size, rank)
    )
    return evaluate(torch.nn.Identity(), loader, torch.device('cpu'))


def _worker(rank, world_size, port, results):
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size
    )
    results[rank] = _evaluate(rank, world_size)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_single_process_accuracy_matches_hand_count():
    acc1, acc5, loss, count = _evaluate(0, 1)
    assert count == NUM_SAMPLES
    assert (acc1, acc5) == _expected()


def test_two_ranks_with_an_uneven_split_count_every_image_once():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    single = _evaluate(0, 1)
    for rank in (0, 1):
        acc1, acc5, loss, count = results[rank]
        assert count == NUM_SAMPLES  # not 8: no padded duplicate
        assert (acc1, acc5) == _expected()
        assert abs(loss - single[2]) < 1e-9
