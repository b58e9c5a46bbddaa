"""engine/compilation.py (TRAIN.COMPILE): compiled models match eager ones, blocks share graphs,
nothing recompiles after warm-up (also under DDP), and checkpoints keep the official names.

Backends: 'aot_eager' traces like inductor (dynamo graph capture, AOT autograd) but runs the traced
ATen graph instead of generated code; the tests that check what compilation does to the model
(graph capture of the mask input, checkpointing, names, resume) use it, because inductor's C++
compilation takes tens of seconds per graph on two CPU cores. One test compiles with inductor
itself, on the smallest model, to check generated code against eager arithmetic.
"""

import os
import re

import pytest
import torch
import torch._inductor.config
import torch.distributed as dist
from torch._dynamo.utils import counters

import main_finetune
import main_simmim
from config import load_config
from engine.compilation import compile_model
from engine.launch import run
from models import build_model, transformer_blocks
from tests.conftest import ROOT
from utils.distributed import wrap_ddp
from utils.safe_load import load_checkpoint_file

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')
# Two-stage models at 32 px, so that tracing stays short on two CPU cores: Swin stage 0 has an
# unshifted and a shifted block on its 8x8 map, stage 1 one block with the window clamped to 4x4.
ARCHITECTURES = {
    'swin': ['MODEL.SWIN.DEPTHS', [2, 1], 'MODEL.SWIN.NUM_HEADS', [1, 2]],
    'swinv2': [
        'MODEL.TYPE',
        'swinv2',
        'MODEL.SWINV2.EMBED_DIM',
        16,
        'MODEL.SWINV2.DEPTHS',
        [2, 1],
        'MODEL.SWINV2.NUM_HEADS',
        [1, 2],
        'MODEL.SWINV2.WINDOW_SIZE',
        4,
        'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES',
        [0, 0],
    ],
    'vit': [
        'MODEL.TYPE',
        'vit',
        'MODEL.VIT.PATCH_SIZE',
        8,
        'MODEL.VIT.EMBED_DIM',
        16,
        'MODEL.VIT.DEPTH',
        2,
        'MODEL.VIT.NUM_HEADS',
        2,
    ],
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_model(arch, *opts):
    config = load_config(
        TINY, ['MODEL.DROP_PATH_RATE', 0.0, 'DATA.IMG_SIZE', 32, *ARCHITECTURES[arch], *opts]
    )
    torch.manual_seed(0)
    model = build_model(config, is_pretrain=True)
    with torch.no_grad():  # random values everywhere (zero-initialised tables would hide bugs)
        for p in model.parameters():
            p.normal_(0, 0.2)
    side = config.DATA.IMG_SIZE // model.patch_size
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, generator=gen)
    mask = (torch.rand(2, side, side, generator=gen) < 0.6).long()
    return model, images, mask


def loss_and_grads(model, images, mask):
    model.zero_grad(set_to_none=True)
    loss = model(images, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_step(eager, compiled, rtol, atol):
    torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=atol)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(
            compiled[1][name],
            eager[1][name],
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f'{name}: {m}',
        )


def graphs_compiled():
    return counters['stats']['unique_graphs']


@pytest.mark.parametrize(
    'arch, mode', [('swin', 'blocks'), ('swinv2', 'model'), ('vit', 'blocks'), ('vit', 'model')]
)
def test_compiled_model_gives_eager_loss_and_gradients(arch, mode):
    model, images, mask = tiny_model(arch)
    eager = loss_and_grads(model, images, mask)
    compile_model(model, mode, backend='aot_eager')
    compiled = loss_and_grads(model, images, mask)
    assert graphs_compiled() > 0  # it really ran compiled
    assert_same_step(eager, compiled, rtol=1e-5, atol=1e-6)


def test_inductor_compiled_blocks_give_eager_loss_and_gradients():
    model, images, mask = tiny_model('vit', 'MODEL.VIT.DEPTH', 1)
    eager = loss_and_grads(model, images, mask)
    compile_model(model, 'blocks', backend='inductor')
    # In-process C++ compilation: a worker pool costs more than it saves for two small graphs.
    with torch._inductor.config.patch(compile_threads=1):
        compiled = loss_and_grads(model, images, mask)
    assert graphs_compiled() == 1
    assert_same_step(eager, compiled, rtol=1e-4, atol=1e-5)


def test_blocks_of_one_shape_share_a_graph_and_nothing_recompiles_after_warmup():
    # Depths 3-2: stage 0 runs unshifted, shifted, unshifted blocks on its 8x8 map, stage 1 two
    # unshifted blocks (window clamped to its 4x4 map): 5 blocks, 3 distinct graphs.
    model, images, mask = tiny_model('swin', 'MODEL.SWIN.DEPTHS', [3, 2])
    assert len(transformer_blocks(model)) == 5
    compile_model(model, 'blocks', backend='eager')
    model(images, mask).backward()
    assert graphs_compiled() == 3
    for _ in range(2):
        model(images, mask).backward()
    model.eval()
    with torch.no_grad():
        model(images, mask)
    assert graphs_compiled() == 6  # one more per shape for evaluation (no autograd)
    model.train()
    model(images, mask).backward()
    assert graphs_compiled() == 6
    assert not counters['recompiles'] and 'recompile_limit' not in str(dict(counters['misc']))


def test_compiled_blocks_with_gradient_checkpointing_give_eager_gradients():
    model, images, mask = tiny_model('swin')
    eager = loss_and_grads(model, images, mask)
    checkpointed, _, _ = tiny_model('swin', 'TRAIN.USE_CHECKPOINT', True)
    assert checkpointed.encoder.layers[0].use_checkpoint
    compile_model(checkpointed, 'blocks', backend='aot_eager')
    assert_same_step(eager, loss_and_grads(checkpointed, images, mask), rtol=1e-5, atol=1e-6)


def test_compiled_model_under_ddp_does_not_recompile_after_warmup():
    store = dist.HashStore()
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        model, images, mask = tiny_model('swin')
        compile_model(model, 'blocks', backend='aot_eager')
        ddp = wrap_ddp(model, torch.device('cpu'))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(4):
            ddp(images, mask).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 0:
                after_warmup = graphs_compiled()
        assert after_warmup == 3 and graphs_compiled() == after_warmup
    finally:
        dist.destroy_process_group()


def test_compile_model_rejects_an_unknown_mode_and_a_model_without_blocks():
    with pytest.raises(ValueError, match='TRAIN.COMPILE'):
        compile_model(torch.nn.Linear(2, 2), 'everything')
    with pytest.raises(ValueError, match='TRAIN.COMPILE model'):
        compile_model(torch.nn.Linear(2, 2), 'blocks')


def pretrain(output, *args):
    code = run(main_simmim.main, ['--cfg', TINY, '--output', str(output), *args], is_pretrain=True)
    return code, os.path.join(str(output), 'simmim_pretrain', 'tiny')


@pytest.mark.slow
@pytest.mark.parametrize('first, then', [('blocks', ''), ('', 'model')])
def test_compiled_and_eager_runs_resume_each_other_with_official_names(tmp_path, first, then):
    def flags(mode, epochs):
        return (['--compile', mode] if mode else []) + [
            '--opts',
            'TRAIN.COMPILE_BACKEND',
            'aot_eager',
            'TRAIN.EPOCHS',
            str(epochs),
            'DATA.SYNTHETIC.TRAIN_SIZE',
            '16',
        ]

    code, run_dir = pretrain(tmp_path, *flags(first, 1))
    assert code == 0
    checkpoint = load_checkpoint_file(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    eager_names = set(build_model(load_config(TINY)).state_dict())
    assert set(checkpoint['model']) == eager_names  # official names, no '_orig_mod.'
    code, run_dir = pretrain(tmp_path, *flags(then, 2))
    assert code == 0
    log = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert 'resumed from' in log and 'Train: [1/2]' in log
    final = load_checkpoint_file(os.path.join(run_dir, 'ckpt_epoch_1.pth'))
    assert set(final['model']) == eager_names
    # The same weights as two epochs straight in eager mode (aot_eager traces the eager ops).
    code, alone = pretrain(tmp_path / 'alone', *flags('', 2))
    assert code == 0
    straight = load_checkpoint_file(os.path.join(alone, 'ckpt_epoch_1.pth'))['model']
    difference = torch.stack(
        [(final['model'][k].double() - straight[k].double()).abs().max() for k in straight]
    ).max()
    assert difference < 1e-5  # NaN fails too


@pytest.mark.slow
def test_compiled_finetuning_evaluates_and_measures_throughput(tmp_path):
    cfg = os.path.join(
        ROOT, 'configs', 'quickstart', 'simmim_finetune__swin_tiny__img64__synthetic.yaml'
    )
    opts = [
        '--opts',
        'TRAIN.COMPILE_BACKEND',
        'aot_eager',
        'TRAIN.EPOCHS',
        '1',
        'DATA.NUM_WORKERS',
        '0',
        'DATA.BATCH_SIZE',
        '8',
        'DATA.SYNTHETIC.TRAIN_SIZE',
        '16',
        'DATA.SYNTHETIC.VAL_SIZE',
        '12',
        'MODEL.SWIN.EMBED_DIM',
        '16',
        'MODEL.SWIN.DEPTHS',
        '[1,1,1]',
        'TENSORBOARD',
        'False',
    ]

    def finetune(*flags):
        return run(
            main_finetune.main,
            ['--cfg', cfg, '--output', str(tmp_path), *flags, *opts],
            is_pretrain=False,
        )

    assert finetune() == 0  # an eager fine-tuning run writes the checkpoint to evaluate
    run_dir = os.path.join(
        str(tmp_path), 'simmim_finetune', 'simmim_finetune__swin_tiny__img64__synthetic'
    )
    best = os.path.join(run_dir, 'model_best.pth')
    assert set(load_checkpoint_file(best)['model']) == set(
        build_model(
            load_config(cfg, opts[1:] + ['MODEL.NUM_CLASSES', 8], is_pretrain=False),
            is_pretrain=False,
        ).state_dict()
    )
    assert finetune('--compile', 'blocks', '--eval', '--resume', best) == 0  # a last batch of 4
    assert finetune('--compile', 'model', '--throughput') == 0
    log = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert 'Accuracy of the network on the 12 test images' in log
    assert re.search(r'batch_size 8 throughput [\d.]+', log)
