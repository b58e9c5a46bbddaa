import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config
from data import build_loader
from data.datasets import ImageFolderDataset, MaskedImageDataset
from data.masking import MaskGenerator
from data.pretrain_transform import build_pretrain_transform
from data.synthetic import SHAPES, SyntheticShapes
from data.transforms import to_rgb
from utils.errors import BadImageError, ConfigError, DataError


def _write_rgb(path, colour=(200, 30, 60), size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, colour).save(path, fmt)
    return path


def _config(tmp_path, is_pretrain=True, **opts):
    """A tiny ViT config on the synthetic set (48 px, 4 px model patches, 8 px mask patches)."""
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(
        'MODEL:\n  TYPE: vit\n  NUM_CLASSES: 0\n  VIT:\n    PATCH_SIZE: 4\n'
        'DATA:\n  IMG_SIZE: 48\n  MASK_PATCH_SIZE: 8\n  DATASET: synthetic\n'
        '  BATCH_SIZE: 4\n  NUM_WORKERS: 0\n  PIN_MEMORY: False\n'
        '  SYNTHETIC:\n    TRAIN_SIZE: 16\n    VAL_SIZE: 6\n    NUM_CLASSES: 4\n'
    )
    flat = [str(x) for kv in opts.items() for x in (kv[0].replace('__', '.'), kv[1])]
    return load_config(str(cfg), flat, is_pretrain=is_pretrain)


# ------------------------------------------------------------------------------------------------
# Image modes
# ------------------------------------------------------------------------------------------------
def _pixel(img):
    rgb = to_rgb(img)
    assert rgb.mode == 'RGB' and rgb.size == img.size
    return tuple(int(v) for v in np.asarray(rgb)[0, 0])


def _palette_image():
    img = Image.new('P', (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return img


@pytest.mark.parametrize(
    'img, expected',
    [
        (Image.new('L', (4, 4), 100), (100, 100, 100)),
        (Image.new('LA', (4, 4), (100, 255)), (100, 100, 100)),
        (
            Image.new('LA', (4, 4), (0, 0)),
            (255, 255, 255),
        ),  # fully transparent: background, not black
        (_palette_image(), (10, 200, 30)),
        (Image.new('RGBA', (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new('RGBA', (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new('RGBA', (4, 4), (255, 0, 0, 128)), (255, 127, 127)),
        (Image.new('CMYK', (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new('CMYK', (4, 4), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new('I;16', (4, 4), 65535), (255, 255, 255)),
        (Image.new('I;16', (4, 4), 0), (0, 0, 0)),
        (Image.new('I;16', (4, 4), 128 * 257), (128, 128, 128)),
        (Image.new('I;16', (4, 4), 1000), (4, 4, 4)),  # PIL's own convert clips this to white
        (Image.new('I', (4, 4), 65535), (255, 255, 255)),
        (Image.new('I', (4, 4), 32896), (128, 128, 128)),
        (Image.new('F', (4, 4), 0.5), (128, 128, 128)),
    ],
)
def test_every_image_mode_becomes_rgb_with_sensible_values(img, expected):
    assert _pixel(img) == expected


def test_sixteen_bit_png_file_keeps_its_grey_levels(tmp_path):
    values = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / 'depth.png')
    Image.new('CMYK', (2, 2), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg')
    dataset = ImageFolderDataset(str(tmp_path))  # sorted: cmyk.jpg, depth.png
    assert [img.mode for img, _ in dataset] == ['RGB', 'RGB']
    assert np.asarray(dataset[0][0])[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(dataset[1][0])[..., 0].tolist() == [[0, 255], [128, 4]]


@pytest.mark.parametrize('conversion', ['careful', 'official'])
def test_rgb_conversion_is_a_config_choice(tmp_path, conversion):
    # 'official' is PIL's convert('RGB') as the official loaders: a transparent pixel keeps its
    # stored colour (black here) and 16-bit grey 1000 saturates; 'careful' gives white and 4.
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGBA', (48, 48), (0, 0, 0, 0)).save(images / 'a_transparent.png')
    Image.fromarray(np.full((48, 48), 1000, np.uint16)).save(images / 'b_depth.png')
    config = _config(
        tmp_path,
        DATA__DATASET='folder',
        DATA__DATA_PATH=str(images),
        DATA__BATCH_SIZE=1,
        DATA__RGB_CONVERSION=conversion,
    )
    dataset, _ = build_loader(config, is_pretrain=True)
    got = [tuple(np.asarray(dataset.base[i][0])[0, 0].tolist()) for i in range(2)]
    if conversion == 'official':
        expected = [
            tuple(np.asarray(Image.open(images / name).convert('RGB'))[0, 0].tolist())
            for name in ('a_transparent.png', 'b_depth.png')
        ]
        assert expected == [(0, 0, 0), (255, 255, 255)]
    else:
        expected = [(255, 255, 255), (4, 4, 4)]
    assert got == expected
    assert dataset.transform.rgb_conversion == conversion


# ------------------------------------------------------------------------------------------------
# Folder layouts and errors
# ------------------------------------------------------------------------------------------------
def test_flat_folder_is_scanned_recursively_with_label_zero(tmp_path):
    _write_rgb(tmp_path / 'a.jpg')
    _write_rgb(tmp_path / 'nested' / 'deeper' / 'b.PNG', fmt='PNG')
    (tmp_path / 'notes.txt').write_text('not an image')
    dataset = ImageFolderDataset(str(tmp_path))
    assert dataset.classes == []
    assert [label for _, label in dataset.samples] == [0, 0]
    assert [p.rsplit('/', 1)[1] for p, _ in dataset.samples] == ['a.jpg', 'b.PNG']


def test_class_subfolders_give_sorted_labels(tmp_path):
    _write_rgb(tmp_path / 'zebra' / '1.png')
    _write_rgb(tmp_path / 'ant' / 'inner' / '2.png')
    _write_rgb(tmp_path / 'ant' / '3.jpg')
    (tmp_path / 'empty').mkdir()
    _write_rgb(tmp_path / '.cache' / 'x.png')
    dataset = ImageFolderDataset(str(tmp_path))
    assert dataset.classes == ['ant', 'zebra']
    assert [label for _, label in dataset.samples] == [0, 0, 1]
    img, label = dataset[2]
    assert (img.mode, label, img.getpixel((0, 0))) == ('RGB', 1, (200, 30, 60))


def _bad_files(folder):
    good = _write_rgb(folder / 'a_good.png', colour=(0, 255, 0))
    (folder / 'b_empty.jpg').write_bytes(b'')
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, 'JPEG'
    )
    (folder / 'c_truncated.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / 'd_text.jpg').write_text('this is not a JPEG')
    return good


def test_bad_files_are_skipped_and_reported_once_each(tmp_path):
    _bad_files(tmp_path)
    dataset = ImageFolderDataset(str(tmp_path), on_bad_image='skip')
    for index in (1, 2, 3, 2):
        img, _ = dataset[index]  # each bad file is replaced by the next readable (wrapping)
        assert img.getpixel((0, 0)) == (0, 255, 0)
    report = dataset.unreadable_report()
    for name in ('b_empty.jpg', 'c_truncated.jpg', 'd_text.jpg'):
        assert report.count(f'{tmp_path / name} (') == 1  # named once, with its reason
    assert report.startswith('3 unreadable image file(s) found') and '3 of the 4 files' in report
    dataset[1]  # met again (the next epoch): already reported, so no new report
    assert dataset.unreadable_report() == ''


def test_bad_files_found_in_worker_processes_are_reported_by_the_main_process(tmp_path):
    _bad_files(tmp_path)
    dataset = ImageFolderDataset(str(tmp_path), on_bad_image='skip')
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, collate_fn=lambda sample: sample[1]
    )
    assert list(loader) == [0, 0, 0, 0]
    report = dataset.unreadable_report()
    assert all(name in report for name in ('b_empty.jpg', 'c_truncated.jpg', 'd_text.jpg'))


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    for cls in ('classA', 'classB'):
        for i in range(12):
            _write_rgb(tmp_path / cls / f'{i:02d}.png')
    (tmp_path / 'classB' / 'dirloop').symlink_to('..')  # back up to the data root
    (tmp_path / 'classA' / 'again').symlink_to(tmp_path / 'classA')  # to itself
    (tmp_path / 'classA' / 'alias.png').symlink_to(tmp_path / 'classA' / '00.png')
    dataset = ImageFolderDataset(str(tmp_path))
    assert dataset.classes == ['classA', 'classB'] and len(dataset) == 24
    assert sorted(label for _, label in dataset.samples) == [0] * 12 + [1] * 12


@pytest.mark.parametrize('name', ['b_empty.jpg', 'c_truncated.jpg', 'd_text.jpg'])
def test_bad_files_are_fatal_with_on_bad_image_error(tmp_path, name):
    _bad_files(tmp_path)
    dataset = ImageFolderDataset(str(tmp_path), on_bad_image='error')
    index = [p.endswith(name) for p, _ in dataset.samples].index(True)
    with pytest.raises(BadImageError) as info:
        dataset[index]
    assert name in str(info.value) and 'DATA.ON_BAD_IMAGE skip' in str(info.value)


@pytest.mark.parametrize('make', ['missing', 'empty', 'no_images'])
def test_missing_or_empty_folder_raises_a_clear_error(tmp_path, make):
    root = tmp_path / 'data'
    if make != 'missing':
        root.mkdir()
    if make == 'no_images':
        (root / 'cls').mkdir()
        (root / 'cls' / 'readme.txt').write_text('x')
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataset(str(root))
    message = str(info.value)
    for words in (str(root), 'class sub-folders', '.jpg', '--data-path', 'DATA.DATASET synthetic'):
        assert words in message


def test_empty_data_path_with_imagenet_says_how_to_fix(tmp_path):
    config = _config(tmp_path, DATA__DATASET='imagenet')
    with pytest.raises(ConfigError, match='--data-path DIR.*DATA.DATASET synthetic'):
        build_loader(config, is_pretrain=True)


# ------------------------------------------------------------------------------------------------
# Synthetic data and per-sample determinism
# ------------------------------------------------------------------------------------------------
def test_synthetic_images_are_a_pure_function_of_seed_split_and_index():
    a, b = SyntheticShapes(20, 8, 32, seed=3), SyntheticShapes(20, 8, 32, seed=3)
    for index in (0, 5, 19):
        (img_a, label_a), (img_b, label_b) = a[index], b[index]
        assert img_a.mode == 'RGB' and img_a.size == (32, 32)
        assert label_a == label_b == index % 8
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
    first = np.asarray(a[0][0])
    assert not np.array_equal(first, np.asarray(SyntheticShapes(20, 8, 32, seed=4)[0][0]))
    assert not np.array_equal(first, np.asarray(SyntheticShapes(20, 8, 32, 3, 'val')[0][0]))
    assert a.classes == list(SHAPES[:8])


def test_synthetic_classes_differ_and_class_count_is_bounded():
    dataset = SyntheticShapes(10, len(SHAPES), 32)
    images = [np.asarray(dataset[i][0]) for i in range(10)]
    assert len({img.tobytes() for img in images}) == 10
    with pytest.raises(ValueError, match=str(len(SHAPES))):
        SyntheticShapes(10, len(SHAPES) + 1, 32)


def _masked_dataset(tmp_path):
    config = _config(tmp_path)
    return MaskedImageDataset(
        SyntheticShapes(8, 4, 48),
        build_pretrain_transform(config),
        MaskGenerator(48, 8, 4, 0.6),
        seed=11,
    )


def _rng_snapshot():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def test_pretraining_sample_is_a_pure_function_of_seed_epoch_index(tmp_path):
    dataset = _masked_dataset(tmp_path)
    img, mask, label = dataset[(2, 5)]
    assert img.shape == (3, 48, 48) and mask.shape == (12, 12) and label == 1
    dataset[(0, 0)], dataset[(7, 3)]  # other draws in between change nothing
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    before = _rng_snapshot()
    img2, mask2, _ = dataset[(2, 5)]
    after = _rng_snapshot()
    assert torch.equal(img, img2) and torch.equal(mask, mask2)
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])
    img3, mask3, _ = dataset[(3, 5)]  # a new epoch: new augmentation and mask
    assert not torch.equal(img, img3) and not torch.equal(mask, mask3)
    assert torch.equal(dataset[5][0], dataset[(0, 5)][0])  # a plain index means epoch 0


# ------------------------------------------------------------------------------------------------
# build_loader
# ------------------------------------------------------------------------------------------------
def _first_batch(loader):
    return next(iter(loader))


def test_build_loader_pretrain_batches_match_for_zero_and_two_workers(tmp_path):
    # ... and whether the workers hand over 8-bit crops, normalised here, or normalise themselves.
    batches = []
    for workers, on_device in ((0, True), (2, True), (2, False)):
        config = _config(tmp_path, DATA__NUM_WORKERS=workers, DATA__NORMALIZE_ON_DEVICE=on_device)
        dataset, loader = build_loader(config, is_pretrain=True)
        loader.sampler.set_epoch(1)
        batches.append(_first_batch(loader))
    img, mask, label = batches[0]
    assert img.shape == (4, 3, 48, 48) and img.dtype == torch.float32
    assert mask.shape == (4, 12, 12) and mask.dtype == torch.int64
    assert label.shape == (4,) and label.dtype == torch.int64
    assert len(dataset) == 16 and len(loader) == 4
    for other in batches[1:]:
        for a, b in zip(batches[0], other, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_build_loader_finetune_on_synthetic_data(tmp_path):
    config = _config(tmp_path, is_pretrain=False)
    train, val, train_loader, val_loader, mixup_fn, num_classes = build_loader(
        config, is_pretrain=False
    )
    assert num_classes == 4 and mixup_fn is not None and (len(train), len(val)) == (16, 6)
    img, label = _first_batch(train_loader)
    assert img.shape == (4, 3, 48, 48) and label.dtype == torch.int64
    assert torch.equal(train[(1, 3)][0], train[(1, 3)][0])  # RandAugment etc. seeded per sample
    assert not torch.equal(train[(1, 3)][0], train[(2, 3)][0])
    assert sum(len(labels) for _, labels in val_loader) == 6  # no padding, last batch kept


def test_finetune_class_count_mismatch_names_both_numbers(tmp_path):
    config = _config(tmp_path, is_pretrain=False, MODEL__NUM_CLASSES=5)
    with pytest.raises(ConfigError, match='MODEL.NUM_CLASSES is 5 but the data has 4 classes'):
        build_loader(config, is_pretrain=False)


def test_finetune_train_and_val_class_lists_must_match(tmp_path):
    for split, cls in [('train', 'cat'), ('train', 'dog'), ('val', 'cat'), ('val', 'emu')]:
        _write_rgb(tmp_path / 'data' / split / cls / 'x.png')
    config = _config(
        tmp_path,
        is_pretrain=False,
        DATA__DATASET='folder',
        DATA__DATA_PATH=str(tmp_path / 'data'),
        DATA__BATCH_SIZE=1,
    )
    with pytest.raises(DataError, match=r"only in train: \['dog'\], only in val: \['emu'\]"):
        build_loader(config, is_pretrain=False)


def test_batch_larger_than_a_ranks_share_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '4')
    config = _config(tmp_path, DATA__BATCH_SIZE=8)
    with pytest.raises(ConfigError) as info:
        build_loader(config, is_pretrain=True)
    for words in (
        'DATA.BATCH_SIZE 8',
        '16 images',
        'world size 4',
        '4 per process',
        '--batch-size',
    ):
        assert words in str(info.value)


def test_randaugment_posterize_at_top_magnitude_works():
    """The official fine-tuning RandAugment (increasing magnitude, mstd 0.5) can ask posterize to
    keep 0 bits; Pillow 13 raises on that, which would kill fine-tuning mid-epoch (hence the
    pin)."""
    from timm.data.auto_augment import posterize

    image = Image.new('RGB', (8, 8), (200, 100, 50))
    assert posterize(image, 0).getpixel((0, 0)) == (0, 0, 0)
