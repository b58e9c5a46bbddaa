"""Every bad input gets one clear paragraph naming the problem and the fix (or a logged skip where
that is the configured behaviour), an exit code, and no traceback wall."""

import os

import pytest
import torch

import main_finetune
import main_simmim
from engine.launch import run
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')


def pretrain(capsys, tmp_path, *args, opts=()):
    code = run(
        main_simmim.main,
        [
            '--cfg',
            TINY,
            '--output',
            str(tmp_path / 'out'),
            *args,
            '--opts',
            'TRAIN.EPOCHS',
            '1',
            *map(str, opts),
        ],
    )
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert 'Traceback' not in output
    return code, output


def image_folder(root, count=16, size=64):
    from data.synthetic import SyntheticShapes

    images = SyntheticShapes(count, 2, size, seed=0)
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        images[i][0].save(os.path.join(root, f'{i:03d}.png'))
    return str(root)


def folder_opts(path, *more):
    return ['DATA.DATASET', 'folder', 'DATA.DATA_PATH', path, *more]


def test_missing_data_path(capsys, tmp_path):
    code, out = pretrain(capsys, tmp_path, opts=folder_opts(str(tmp_path / 'nowhere')))
    assert code == 2 and 'Data folder not found' in out and '--data-path' in out


def test_data_path_naming_a_file(capsys, tmp_path):
    (tmp_path / 'images.zip').write_text('an archive, not a folder')
    code, out = pretrain(capsys, tmp_path, opts=folder_opts(str(tmp_path / 'images.zip')))
    assert code == 2 and f'leads through a file ({tmp_path / "images.zip"}), not a folder' in out
    assert 'not found' not in out


def test_data_path_naming_a_tar_file_that_is_no_tar(capsys, tmp_path):
    (tmp_path / 'images.tar').write_text('a text file, not a shard')
    code, out = pretrain(capsys, tmp_path, opts=folder_opts(str(tmp_path / 'images.tar')))
    assert code == 2 and f'The shard {tmp_path / "images.tar"} is damaged' in out
    assert 'not a readable tar file' in out and 'Traceback' not in out


def test_data_path_not_given_for_an_image_folder_config(capsys, tmp_path):
    code, out = pretrain(capsys, tmp_path, opts=['DATA.DATASET', 'imagenet'])
    assert code == 2 and 'pass --data-path DIR' in out and 'DATA.DATASET synthetic' in out


@pytest.mark.parametrize('content', [None, 'notes.txt'])
def test_empty_folder_or_no_images(capsys, tmp_path, content):
    folder = tmp_path / 'data'
    folder.mkdir()
    if content:
        (folder / content).write_text('not an image')
    code, out = pretrain(capsys, tmp_path, opts=folder_opts(str(folder)))
    assert code == 2 and 'No images found in data folder' in out and '.jpg' in out


def _add_bad_files(folder):
    (folder / 'zero.png').write_bytes(b'')
    good = (folder / '000.png').read_bytes()
    (folder / 'truncated.png').write_bytes(good[: len(good) // 2])
    (folder / 'text.jpg').write_text('this is not a jpeg')


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_image_files_are_skipped_and_summarised_once(capsys, tmp_path, workers):
    folder = tmp_path / 'data'
    image_folder(folder)
    _add_bad_files(folder)
    code, out = pretrain(
        capsys,
        tmp_path,
        opts=folder_opts(
            str(folder), 'DATA.NUM_WORKERS', workers, 'DATA.BATCH_SIZE', 19, 'TRAIN.EPOCHS', 2
        ),
    )
    assert code == 0
    log = open(
        os.path.join(str(tmp_path / 'out'), 'simmim_pretrain', 'tiny', 'log_rank0.txt')
    ).read()
    # One summary, after the epoch that found them, naming each file once (every epoch reads all).
    assert log.count('unreadable image file(s) found') == 1
    assert 'EPOCH 0: 3 unreadable image file(s) found' in log
    for name in ('zero.png', 'truncated.png', 'text.jpg'):
        assert log.count(f'{folder / name} (') == 1
    assert '3 of the 19 files listed under' in log  # not counted as images


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_image_file_is_fatal_when_configured(capsys, tmp_path, workers):
    folder = tmp_path / 'data'
    image_folder(folder)
    _add_bad_files(folder)
    code, out = pretrain(
        capsys,
        tmp_path,
        opts=folder_opts(
            str(folder),
            'DATA.ON_BAD_IMAGE',
            'error',
            'DATA.NUM_WORKERS',
            workers,
            'DATA.BATCH_SIZE',
            19,
        ),
    )
    assert code == 2 and 'Cannot read image' in out and 'DATA.ON_BAD_IMAGE skip' in out
    assert 'Original Traceback' not in out


def test_images_smaller_than_the_crop_are_upsampled_with_a_warning(capsys, tmp_path):
    folder = image_folder(tmp_path / 'data', size=24)
    code, out = pretrain(capsys, tmp_path, opts=folder_opts(folder))
    assert code == 0 and 'smaller than the 64-pixel crop (DATA.IMG_SIZE)' in out


def test_batch_larger_than_a_ranks_share(capsys, tmp_path):
    code, out = pretrain(capsys, tmp_path, '--batch-size', '64')
    assert code == 2 and 'DATA.BATCH_SIZE 64 is larger than each process' in out and '48' in out


@pytest.mark.parametrize(
    'content, expected',
    [
        (b'', 'is empty (0 bytes)'),
        (b'PK\x03\x04 truncated zip', 'not a readable PyTorch checkpoint'),
        (b'{"model": "json"}', 'not a readable PyTorch checkpoint'),
    ],
)
def test_broken_file_passed_to_resume(capsys, tmp_path, content, expected):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(content)
    code, out = pretrain(capsys, tmp_path, '--resume', str(bad))
    assert code == 2 and expected in out and str(bad) in out


def test_random_bytes_as_a_checkpoint_do_not_suggest_unsafe_loading(capsys, tmp_path):
    bad = tmp_path / 'random.pth'
    bad.write_bytes(bytes(range(256)) * 8)
    code, out = pretrain(capsys, tmp_path, '--resume', str(bad))
    assert code == 2 and 'not a readable PyTorch checkpoint' in out
    assert 'weights_only' not in out and 'will likely succeed' not in out


def test_a_folder_passed_to_resume(capsys, tmp_path):
    code, out = pretrain(capsys, tmp_path, '--resume', str(tmp_path))
    assert code == 2 and f'{tmp_path} is a folder, not a checkpoint file' in out
    assert 'not found' not in out


def test_eval_of_a_checkpoint_whose_model_entry_is_a_tensor(capsys, tmp_path):
    bad = tmp_path / 'tensor.pth'
    torch.save({'model': torch.zeros(3)}, bad)
    code = run(
        main_finetune.main,
        [
            '--cfg',
            TINY,
            '--output',
            str(tmp_path / 'out'),
            '--eval',
            '--resume',
            str(bad),
            '--opts',
            'AUG.MIXUP',
            '0',
            'AUG.CUTMIX',
            '0',
        ],
        is_pretrain=False,
    )
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 2 and "'model' entry is a Tensor, not a state dict" in out and str(bad) in out
    assert 'Traceback' not in out


def test_broken_file_passed_to_pretrained(capsys, tmp_path):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'garbage')
    code = run(
        main_finetune.main,
        [
            '--cfg',
            TINY,
            '--output',
            str(tmp_path / 'out'),
            '--pretrained',
            str(bad),
            '--opts',
            'TRAIN.EPOCHS',
            '1',
            'AUG.MIXUP',
            '0',
            'AUG.CUTMIX',
            '0',
        ],
        is_pretrain=False,
    )
    captured = capsys.readouterr()
    assert code == 2 and 'not a readable PyTorch checkpoint' in captured.out + captured.err


def test_checkpoint_of_another_size_names_the_mismatching_keys(capsys, tmp_path):
    assert pretrain(capsys, tmp_path / 'small')[0] == 0
    small = os.path.join(
        str(tmp_path / 'small' / 'out'), 'simmim_pretrain', 'tiny', 'ckpt_epoch_0.pth'
    )
    code, out = pretrain(capsys, tmp_path, '--resume', small, opts=['MODEL.SWIN.EMBED_DIM', 32])
    assert code == 2 and f'The resume checkpoint {small} does not fit the model' in out
    assert 'encoder.mask_token: checkpoint (1, 1, 16) vs model (1, 1, 32)' in out


def test_auto_resume_meeting_another_models_checkpoint_names_the_file_and_the_fix(capsys, tmp_path):
    assert pretrain(capsys, tmp_path)[0] == 0
    found = os.path.join(str(tmp_path / 'out'), 'simmim_pretrain', 'tiny', 'ckpt_epoch_0.pth')
    code, out = pretrain(capsys, tmp_path, opts=['MODEL.SWIN.EMBED_DIM', 32])
    assert code == 2 and f'The resume checkpoint {found} does not fit the model' in out
    assert 'Auto-resume found it in' in out and '--tag NAME or --output DIR' in out


def test_pretrained_checkpoint_of_another_architecture(capsys, tmp_path):
    assert pretrain(capsys, tmp_path / 'swin')[0] == 0
    swin = os.path.join(
        str(tmp_path / 'swin' / 'out'), 'simmim_pretrain', 'tiny', 'ckpt_epoch_0.pth'
    )
    code = run(
        main_finetune.main,
        [
            '--cfg',
            TINY,
            '--output',
            str(tmp_path / 'out'),
            '--pretrained',
            swin,
            '--opts',
            'MODEL.TYPE',
            'vit',
            'MODEL.VIT.EMBED_DIM',
            '32',
            'MODEL.VIT.DEPTH',
            '2',
            'MODEL.VIT.NUM_HEADS',
            '2',
            'MODEL.VIT.PATCH_SIZE',
            '16',
            'AUG.MIXUP',
            '0',
            'AUG.CUTMIX',
            '0',
        ],
        is_pretrain=False,
    )
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 2 and 'another architecture' in out.lower() and 'Traceback' not in out


@pytest.mark.parametrize(
    'args, expected',
    [
        (['--opts', 'TRAIN.EPOCS', '1'], 'Did you mean TRAIN.EPOCHS'),
        (['--opts', 'DATA.MASK_RATIO', '1.2'], 'DATA.MASK_RATIO must lie in (0, 1)'),
        (['--opts', 'TRAIN.CLIP_GRAD', '-1'], 'TRAIN.CLIP_GRAD must be >= 0 (or None), got -1.0'),
        (['--opts', 'TRAIN.BASE_LR', '1e999'], 'TRAIN.BASE_LR must be >= 0, got inf'),
    ],
)
def test_unknown_or_mistyped_config_key(capsys, tmp_path, args, expected):
    code = run(main_simmim.main, ['--cfg', TINY, '--output', str(tmp_path), *args])
    assert code == 2 and expected in capsys.readouterr().err


def test_eval_with_a_training_only_flag_stops_before_anything_runs(capsys, tmp_path):
    argv = ['--cfg', TINY, '--output', str(tmp_path), '--eval', '--pretrained', 'p.pth']
    assert run(main_finetune.main, argv, is_pretrain=False) == 2
    err = capsys.readouterr().err
    assert 'would do nothing' in err and 'pass it with --resume instead' in err
    assert not os.listdir(tmp_path)  # nothing written


def test_mistyped_flag(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        run(main_simmim.main, ['--cfg', TINY, '--ouput', str(tmp_path)])
    assert info.value.code == 2 and 'did you mean --output' in capsys.readouterr().err


def test_output_folder_that_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    code = run(main_simmim.main, ['--cfg', TINY, '--output', str(blocker / 'sub')])
    err = capsys.readouterr().err
    assert code == 2 and 'Cannot write to the output folder' in err and '--output' in err


def test_an_unexpected_error_in_a_worker_process_exits_instead_of_hanging(tmp_path):
    """An unforeseen exception inside a persistent DataLoader worker propagates out of the script;
    the process must then end with its traceback, not wait forever at exit for its workers."""
    import subprocess
    import sys

    script = (
        f'import sys; sys.path.insert(0, {ROOT!r})\n'
        'import data.loader\n'
        'def broken(config):\n'
        '    def transform(image):\n'
        "        raise ValueError('a transform bug')\n"
        '    return transform\n'
        'data.loader.build_pretrain_transform = broken\n'
        'import main_simmim\n'
        'from engine.launch import run\n'
        'sys.exit(run(main_simmim.main, sys.argv[1:]))\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            '-c',
            script,
            '--cfg',
            TINY,
            '--output',
            str(tmp_path / 'out'),
            '--opts',
            'DATA.NUM_WORKERS',
            '2',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and 'a transform bug' in result.stderr


# -----------------------------------------------------------------------------------------------
# The tools: bad input gets the mains' answer (one paragraph, exit code 2)
# -----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def sharded_source(tmp_path_factory):
    """A sharded checkpoint of the tiny SwinV2 (tests/test_sharded_checkpoint.py's), kept intact:
    each test damages a copy."""
    from tests.test_sharded_checkpoint import save, trained

    return save(str(tmp_path_factory.mktemp('sharded') / 'ckpt_epoch_0'), *trained())


def convert(capsys, *argv):
    from tools import convert_checkpoint

    code = convert_checkpoint.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return code, err


@pytest.mark.parametrize('records', [True, False], ids=['checksums', 'older-without-checksums'])
def test_convert_checkpoint_with_a_truncated_shard(capsys, tmp_path, sharded_source, records):
    import json
    import shutil

    path = tmp_path / 'ckpt_epoch_0'
    shutil.copytree(sharded_source, path)
    shard = path / '__0_0.distcp'
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    if not records:
        marker = json.loads((path / 'COMPLETE').read_text())
        del marker['files']
        (path / 'COMPLETE').write_text(json.dumps(marker))
    code, err = convert(capsys, path, tmp_path / 'out.pth')
    assert code == 2 and err.startswith('Checkpoint error: ')
    assert (str(shard) if records else str(path)) in err and 'truncated' in err, err
    assert not os.path.exists(tmp_path / 'out.pth')


def test_convert_checkpoint_refuses_nonfinite_values_and_a_folder_as_output(
    capsys, tmp_path, sharded_source, monkeypatch
):
    from tools import convert_checkpoint

    (tmp_path / 'out').mkdir()
    code, err = convert(capsys, sharded_source, tmp_path / 'out')
    assert code == 2 and err.startswith('Configuration error: ') and 'existing folder' in err
    assert 'disk' not in err and os.listdir(tmp_path / 'out') == []
    real = convert_checkpoint.read_sharded_checkpoint

    def diverged(path, model_only=False):  # what a run that diverged before saving leaves
        checkpoint = real(path, model_only)
        next(iter(checkpoint['model'].values())).view(-1)[0] = float('nan')
        return checkpoint

    monkeypatch.setattr(convert_checkpoint, 'read_sharded_checkpoint', diverged)
    code, err = convert(capsys, sharded_source, tmp_path / 'out.pth')
    assert code == 2 and err.startswith('Checkpoint error: ') and 'NaN or infinite' in err, err
    assert not os.path.exists(tmp_path / 'out.pth')
