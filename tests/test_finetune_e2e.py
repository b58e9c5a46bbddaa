"""main_finetune.py end to end: an official fine-tune YAML (shrunk by --opts) from a checkpoint that
main_simmim.py wrote at window 6, fine-tuned at window 7 on an image folder; --eval reproduces the
logged accuracy; --throughput; linear probing; clear errors for bad class counts."""

import os
import re

import pytest
import torch

import main_finetune
import main_simmim
from data.synthetic import SyntheticShapes
from engine.launch import run
from engine.tracking import read_metrics
from tests.conftest import ROOT
from utils.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

PRETRAIN_YAML = os.path.join(
    ROOT, 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'
)
FINETUNE_YAML = os.path.join(
    ROOT, 'configs/swin_base__800ep/simmim_finetune__swin_base__img224_window7__800ep.yaml'
)
LINPROBE_YAML = os.path.join(
    ROOT, 'configs/swin_base__800ep/simmim_linprobe__swin_base__img224_window7__800ep.yaml'
)
TINY_SWIN = [
    'MODEL.SWIN.EMBED_DIM',
    '16',
    'MODEL.SWIN.DEPTHS',
    '[1,1,1,1]',
    'MODEL.SWIN.NUM_HEADS',
    '[1,1,2,2]',
    'DATA.NUM_WORKERS',
    '0',
    'PRINT_FREQ',
    '1',
    'TENSORBOARD',
    'False',
]


def write_image_folder(root, per_class=6, num_classes=3):
    for split in ('train', 'val'):
        images = SyntheticShapes(per_class * num_classes, num_classes, 96, seed=1, split=split)
        for i in range(len(images)):
            image, label = images[i]
            folder = os.path.join(root, split, f'class_{label}')
            os.makedirs(folder, exist_ok=True)
            image.save(os.path.join(folder, f'{i}.png'))
    return str(root)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A checkpoint of the official Swin-B pre-training YAML (window 6 at 192), shrunk."""
    out = tmp_path_factory.mktemp('pretrain')
    code = run(
        main_simmim.main,
        [
            '--cfg',
            PRETRAIN_YAML,
            '--output',
            str(out),
            '--batch-size',
            '4',
            '--opts',
            'DATA.DATASET',
            'synthetic',
            'DATA.SYNTHETIC.TRAIN_SIZE',
            '8',
            'TRAIN.EPOCHS',
            '1',
            *TINY_SWIN,
        ],
    )
    assert code == 0
    return os.path.join(
        str(out),
        'simmim_pretrain',
        'simmim_pretrain__swin_base__img192_window6__800ep',
        'ckpt_epoch_0.pth',
    )


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('images'))


def finetune(out, data_path, *flags, opts=(), cfg=FINETUNE_YAML):
    return run(
        main_finetune.main,
        [
            '--cfg',
            cfg,
            '--data-path',
            data_path,
            '--output',
            str(out),
            '--batch-size',
            '6',
            *flags,
            '--opts',
            'TRAIN.EPOCHS',
            '2',
            *TINY_SWIN,
            *opts,
        ],
        is_pretrain=False,
    )


def read_log(out, tag):
    return open(os.path.join(str(out), 'simmim_finetune', tag, 'log_rank0.txt')).read()


FT_TAG = 'simmim_finetune__swin_base__img224_window7__800ep'


def test_finetune_from_our_pretraining_then_eval_reproduces_accuracy(
    tmp_path, pretrained, image_folder
):
    assert finetune(tmp_path, image_folder, '--pretrained', pretrained) == 0
    log = read_log(tmp_path, FT_TAG)
    assert 'from 121 to 169 rows' in log  # window 6 -> 7: relative position tables resized
    assert 'Newly initialised (not in checkpoint): head.*' in log
    assert 'Fine-tuning data from' in log and '3 classes' in log
    logged = [
        float(a)
        for a in re.findall(r'Accuracy of the network on the 18 test images: ([\d.]+)%', log)
    ]
    assert len(logged) == 2
    metrics = read_metrics(os.path.join(str(tmp_path), 'simmim_finetune', FT_TAG))
    val = [r for r in metrics if r['kind'] == 'val']
    assert [round(r['acc1'], 3) for r in val] == logged  # one line per epoch, as logged
    assert [r['epoch'] for r in val] == [0, 1] and all('acc5' in r for r in val)
    best = load_checkpoint_file(
        os.path.join(str(tmp_path), 'simmim_finetune', FT_TAG, 'model_best.pth')
    )
    assert best['accuracy'] == pytest.approx(max(logged), abs=1e-3)

    eval_out = tmp_path / 'eval'
    best_path = os.path.join(str(tmp_path), 'simmim_finetune', FT_TAG, 'model_best.pth')
    assert finetune(eval_out, image_folder, '--eval', '--resume', best_path) == 0
    reproduced = re.findall(
        r'Accuracy of the network on the 18 test images: ([\d.]+)%', read_log(eval_out, FT_TAG)
    )
    assert float(reproduced[0]) == pytest.approx(best['accuracy'], abs=1e-3)


def test_throughput_mode_reports_images_per_second(tmp_path, image_folder):
    assert finetune(tmp_path, image_folder, '--throughput') == 0
    assert re.search(r'batch_size 6 throughput [\d.]+', read_log(tmp_path, FT_TAG))


def test_linear_probe_trains_only_the_head(tmp_path, pretrained, image_folder):
    assert finetune(tmp_path, image_folder, '--pretrained', pretrained, cfg=LINPROBE_YAML) == 0
    run_dir = os.path.join(
        str(tmp_path), 'simmim_linprobe', 'simmim_linprobe__swin_base__img224_window7__800ep'
    )
    log = open(os.path.join(run_dir, 'log_rank0.txt')).read()
    assert 'Optimizer Lars' in log
    final = load_checkpoint_file(os.path.join(run_dir, 'ckpt_epoch_1.pth'))['model']
    loaded = load_checkpoint_file(pretrained)['model']
    # The frozen encoder still holds the pre-trained weights; the head is new.
    assert (
        final['encoder.layers.0.blocks.0.mlp.fc1.weight']
        == loaded['encoder.layers.0.blocks.0.mlp.fc1.weight']
    ).all()
    assert 'head.1.weight' in final and 'head.0.running_mean' in final
    # ... and it trains: epoch 1 moved it from where epoch 0 left it.
    first = load_checkpoint_file(os.path.join(run_dir, 'ckpt_epoch_0.pth'))['model']
    assert not torch.equal(first['head.1.weight'], final['head.1.weight'])
    assert torch.equal(
        first['encoder.layers.0.blocks.0.mlp.fc1.weight'],
        final['encoder.layers.0.blocks.0.mlp.fc1.weight'],
    )


def test_class_count_mismatch_names_both_numbers(tmp_path, image_folder, capsys):
    assert finetune(tmp_path, image_folder, opts=['MODEL.NUM_CLASSES', '1000']) == 2
    captured = capsys.readouterr()
    assert 'MODEL.NUM_CLASSES is 1000 but the data has 3 classes' in captured.out + captured.err


TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')


def test_finetune_resume_is_bit_identical(tmp_path):
    """Fine-tuning with Mixup/CutMix, RandAugment, random erasing and drop path: one epoch, resume,
    one more epoch equals two epochs straight (per-sample seeded augmentations, restored RNGs)."""

    def finetune_tiny(out, epochs):
        return run(
            main_finetune.main,
            [
                '--cfg',
                TINY,
                '--output',
                str(out),
                '--opts',
                'TRAIN.EPOCHS',
                str(epochs),
                'TRAIN.LAYER_DECAY',
                '0.8',
                'DATA.NUM_WORKERS',
                '2',
            ],
            is_pretrain=False,
        )

    assert finetune_tiny(tmp_path / 'straight', 2) == 0
    assert finetune_tiny(tmp_path / 'split', 1) == 0
    assert finetune_tiny(tmp_path / 'split', 2) == 0
    straight, split = (
        load_checkpoint_file(
            os.path.join(str(tmp_path / d), 'simmim_pretrain', 'tiny', 'ckpt_epoch_1.pth')
        )['model']
        for d in ('straight', 'split')
    )
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_official_swin_base_pretraining_yaml_runs_on_an_image_folder(tmp_path, image_folder):
    """Done-when of the pre-training issue: the official Swin-B 800-epoch YAML, unchanged, on the
    CPU with only --data-path, --batch-size and --opts TRAIN.EPOCHS 1 style overrides."""
    code = run(
        main_simmim.main,
        [
            '--cfg',
            PRETRAIN_YAML,
            '--data-path',
            os.path.join(image_folder, 'val', 'class_0'),
            '--batch-size',
            '2',
            '--output',
            str(tmp_path),
            '--opts',
            'TRAIN.EPOCHS',
            '1',
            'DATA.NUM_WORKERS',
            '0',
            'TENSORBOARD',
            'False',
        ],
    )
    assert code == 0
    run_dir = os.path.join(
        str(tmp_path), 'simmim_pretrain', 'simmim_pretrain__swin_base__img192_window6__800ep'
    )
    checkpoint = load_checkpoint_file(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    assert checkpoint['model']['encoder.layers.2.blocks.17.mlp.fc2.weight'].shape == (512, 2048)
