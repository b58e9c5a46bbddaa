"""Tar shards (data/shards.py, data/shard_index.py): the index and its cache, the same samples in
the same order as the image folder they were written from, bad input, the resume fingerprint."""

import io
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint.layout import TrainingState
from config import load_config
from data import build_finetune_data, build_pretrain_data
from data import shard_index as index_module
from data.gpu_decode import EncodedMaskedImageDataset, collate_encoded, decode_batch
from data.loader import _image_source
from data.shard_index import INDEX_SUFFIX, ShardMember, index_files, shard_index
from data.shards import ShardDataset, check_fingerprint, expand_braces, find_shards
from data.tar_members import tarfile_members
from tools.make_shards import convert
from utils.errors import DataError, exit_code_of


def _photo(seed, size=(30, 26)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _image_folder(root, classes=('ant', 'bee', 'cow'), per_class=(4, 3, 5), seed=0):
    for c, (name, count) in enumerate(zip(classes, per_class, strict=True)):
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            _photo(seed + 100 * c + i).save(root / name / f'im{i}.jpg', quality=92)
    return root


@pytest.fixture(scope='module')
def folder_and_shards(tmp_path_factory):
    """An image folder with train/ and val/ (class sub-folders), and its shards (3 per shard)."""
    base = tmp_path_factory.mktemp('shards')
    _image_folder(base / 'folder' / 'train')
    _image_folder(base / 'folder' / 'val', per_class=(2, 2, 1), seed=50)
    convert(str(base / 'folder'), str(base / 'shards'), shard_size=3, log=lambda _: None)
    return base / 'folder', base / 'shards'


def _config(tmp_path, data_path, is_pretrain=True, **opts):
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(
        'MODEL:\n  TYPE: vit\n  NUM_CLASSES: 0\n  VIT:\n    PATCH_SIZE: 4\n'
        'DATA:\n  IMG_SIZE: 16\n  MASK_PATCH_SIZE: 8\n  DATASET: folder\n'
        '  BATCH_SIZE: 2\n  NUM_WORKERS: 0\n  PIN_MEMORY: False\n'
        'AUG:\n  MIXUP: 0.0\n  CUTMIX: 0.0\n'
    )
    flat = ['DATA.DATA_PATH', str(data_path)]
    flat += [str(x) for kv in opts.items() for x in (kv[0].replace('__', '.'), kv[1])]
    return load_config(str(cfg), flat, is_pretrain=is_pretrain)


def _write_tar(path, members):
    """A shard from [(name, bytes)]."""
    with tarfile.open(path, 'w') as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed):
    buffer = io.BytesIO()
    _photo(seed).save(buffer, 'JPEG')
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------------
def test_index_is_built_once_cached_beside_the_shard_and_rebuilt_when_the_shard_changes(
    tmp_path, monkeypatch
):
    shard = _write_tar(
        tmp_path / 'a.tar', [('k0.jpg', _jpeg(0)), ('k0.cls', b'2'), ('d/k1.png', b'x' * 7)]
    )
    builds = []
    real_build = index_module.build_index
    monkeypatch.setattr(
        index_module, 'build_index', lambda path: builds.append(path) or real_build(path)
    )
    index = shard_index(str(shard))
    assert builds == [str(shard)] and os.path.exists(str(shard) + INDEX_SUFFIX)
    assert index.labels.tolist() == [2, -1] and index.sizes.tolist() == [len(_jpeg(0)), 7]
    with open(shard, 'rb') as f:  # the offsets point at the members' bytes
        f.seek(int(index.offsets[1]))
        assert f.read(7) == b'x' * 7
    again = shard_index(str(shard))
    assert len(builds) == 1 and again.offsets.tolist() == index.offsets.tolist()
    _write_tar(shard, [('k0.jpg', _jpeg(1)), ('k0.cls', b'1')])  # new content, new size
    assert shard_index(str(shard)).labels.tolist() == [1] and len(builds) == 2
    os.utime(shard, ns=(1, 1))  # same size, other modification time: indexed again
    shard_index(str(shard))
    assert len(builds) == 3


def test_a_set_of_shards_starts_from_one_combined_index_rebuilt_when_a_shard_changes(
    tmp_path, monkeypatch
):
    shards = [
        str(_write_tar(tmp_path / f's{i}.tar', [(f'k{i}.jpg', _jpeg(i)), (f'k{i}.cls', b'1')]))
        for i in range(3)
    ]
    first = ShardDataset(shards)
    assert len(list(tmp_path.glob('_set-*' + INDEX_SUFFIX))) == 1
    built = []
    real_build = index_module.build_index
    monkeypatch.setattr(index_module, 'build_index', lambda p: built.append(p) or real_build(p))
    opened = []
    real_load = index_module._load
    monkeypatch.setattr(
        index_module, '_load', lambda p, stamp: opened.append(p) or real_load(p, stamp)
    )
    again = ShardDataset(shards)
    assert opened == [] and built == []  # the combined file only
    assert again.samples.offsets.tolist() == first.samples.offsets.tolist()
    _write_tar(shards[1], [('new.jpg', _jpeg(7)), ('new.cls', b'2'), ('x.jpg', _jpeg(8))])
    changed = ShardDataset(shards)
    assert built == [shards[1]] and changed.shard_lengths == [1, 2, 1]
    assert [changed[i][1] for i in range(4)] == [1, 2, -1, 1]


def test_an_unreadable_index_is_rebuilt_with_a_warning(tmp_path, caplog):
    shard = _write_tar(tmp_path / 'a.tar', [('k0.jpg', _jpeg(0)), ('k1.jpg', _jpeg(1))])
    shard_index(str(shard))
    with open(str(shard) + INDEX_SUFFIX, 'wb') as f:
        f.write(b'garbage, not a zip')
    with caplog.at_level(logging.WARNING, logger='simmim.data'):
        index = shard_index(str(shard))
    assert len(index.offsets) == 2 and 'cannot be read' in caplog.text
    assert np.load(str(shard) + INDEX_SUFFIX)['offsets'].tolist() == index.offsets.tolist()


def test_a_read_only_shard_folder_gets_its_index_in_the_cache_folder(tmp_path):
    folder = tmp_path / 'ro'
    folder.mkdir()
    shard = _write_tar(folder / 'a.tar', [('k0.jpg', _jpeg(0))])
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: block the name instead
        folder.chmod(0o755)
        os.mkdir(str(shard) + INDEX_SUFFIX)
    try:
        index = shard_index(str(shard), cache_dir=str(tmp_path / 'cache'))
    finally:
        folder.chmod(0o755)
    assert index.index_file == index_files(str(shard), str(tmp_path / 'cache'))[1]
    assert os.path.isfile(index.index_file) and not os.path.isfile(str(shard) + INDEX_SUFFIX)
    assert shard_index(str(shard), cache_dir=str(tmp_path / 'cache')).index_file == index.index_file


def test_brace_patterns_expand_in_order_with_zero_padding():
    assert expand_braces('d/t-{0008..0011}.tar') == [f'd/t-{i:04d}.tar' for i in range(8, 12)]
    assert expand_braces('{a,b}-{1..2}.tar') == ['a-1.tar', 'a-2.tar', 'b-1.tar', 'b-2.tar']


# ------------------------------------------------------------------------------------------------
# Same samples, same order as the folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('split_path', ['train', 'pattern'])
def test_pretraining_on_shards_gives_the_folder_samples_in_the_folder_order(
    tmp_path, folder_and_shards, split_path
):
    folder, shards = folder_and_shards
    shard_path = shards if split_path == 'train' else shards / 'folder-train-{0000..0003}.tar'
    folder_path = folder if split_path == 'train' else folder / 'train'
    on_folder = build_pretrain_data(_config(tmp_path, folder_path), 4)
    on_shards = build_pretrain_data(_config(tmp_path, shard_path), 4)
    assert isinstance(on_shards.train_set.base, ShardDataset)
    assert (
        len(on_shards.train_set)
        == len(on_folder.train_set)
        == (17 if split_path == 'train' else 12)
    )
    for data in (on_folder, on_shards):
        data.train_loader.sampler.set_epoch(3)
    keys = list(on_folder.train_loader.sampler)
    assert keys == list(on_shards.train_loader.sampler)
    for key in keys:
        (img_a, mask_a, _), (img_b, mask_b, _) = on_folder.train_set[key], on_shards.train_set[key]
        assert torch.equal(img_a, img_b) and torch.equal(mask_a, mask_b)
    batch_a, batch_b = next(iter(on_folder.train_loader)), next(iter(on_shards.train_loader))
    assert all(torch.equal(a, b) for a, b in zip(batch_a[:2], batch_b[:2], strict=True))


@pytest.mark.parametrize('layout', ['named', 'folders'])
def test_finetuning_on_shards_gives_the_folder_labels_classes_and_pixels(
    tmp_path, folder_and_shards, layout
):
    folder, shards = folder_and_shards
    if layout == 'folders':  # DATA_PATH/train and DATA_PATH/val shard folders, no _info.json
        for split, name in (('train', 'train'), ('val', 'validation')):
            os.makedirs(tmp_path / 'split' / split)
            for shard in sorted(shards.glob(f'*-{name}-*.tar')):
                os.symlink(shard, tmp_path / 'split' / split / shard.name)
        shards = tmp_path / 'split'
    on_folder = build_finetune_data(_config(tmp_path, folder, False))
    on_shards = build_finetune_data(_config(tmp_path, shards, False))
    assert on_shards.num_classes == on_folder.num_classes == 3
    expected_classes = ['ant', 'bee', 'cow'] if layout == 'named' else ['0', '1', '2']
    assert list(on_shards.train_set.classes) == expected_classes
    for a, b in (
        (on_folder.train_set, on_shards.train_set),
        (on_folder.val_set, on_shards.val_set),
    ):
        assert len(a) == len(b)
        for i in range(len(a)):
            (img_a, label_a), (img_b, label_b) = a[(1, i)], b[(1, i)]
            assert label_a == label_b and torch.equal(img_a, img_b)


def test_a_member_reads_its_bytes_and_names_shard_and_member(folder_and_shards):
    _, shards = folder_and_shards
    dataset = ShardDataset(find_shards(str(shards), 'train')[0])
    member, label = dataset.samples[4]
    assert isinstance(member, ShardMember) and label == 1
    assert str(member).endswith('folder-train-0001.tar:bee/im0.jpg')
    with open(folder_and_shards[0] / 'train' / 'bee' / 'im0.jpg', 'rb') as f:
        assert member.read() == f.read()  # the original bytes
    assert dataset.shard_lengths == [3, 3, 3, 3]


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def _damaged(tmp_path, how):
    shard = _write_tar(
        tmp_path / 'd.tar',
        [
            (f'k{i}.{ext}', _jpeg(i) if ext == 'jpg' else str(i).encode())
            for i in range(4)
            for ext in ('jpg', 'cls')
        ],
    )
    data = bytearray(shard.read_bytes())
    if how == 'truncated':
        data = data[: len(data) // 2]
    else:  # a damaged header in the middle
        second_header = shard_index(str(shard)).offsets[2] - 512
        os.remove(str(shard) + INDEX_SUFFIX)
        data[second_header : second_header + 100] = b'\xff' * 100
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize('how', ['truncated', 'corrupt'])
def test_a_damaged_shard_stops_with_its_name_or_keeps_its_readable_samples(tmp_path, how, caplog):
    shard = _damaged(tmp_path, how)
    with pytest.raises(DataError) as err:
        ShardDataset([str(shard)], on_bad_image='error')
    message = str(err.value)
    assert str(shard) in message and 'Fix:' in message and exit_code_of(err.value) == 2
    assert ('truncated' if how == 'truncated' else 'not valid') in message
    with caplog.at_level(logging.WARNING, logger='simmim.data'):
        dataset = ShardDataset([str(shard)], on_bad_image='skip')
    assert 0 < len(dataset) < 4 and str(shard) in caplog.text
    assert all(dataset[i][1] == i for i in range(len(dataset)))  # those before the damage


def test_an_image_that_does_not_decode_is_skipped_and_named_by_shard_and_member(tmp_path):
    shard = _write_tar(
        tmp_path / 's.tar', [('a.jpg', _jpeg(0)), ('b.jpg', b'not a jpeg'), ('c.jpg', _jpeg(2))]
    )
    dataset = ShardDataset([str(shard)])
    assert np.array_equal(np.asarray(dataset[1][0]), np.asarray(dataset[2][0]))  # next readable
    report = dataset.unreadable_report()
    assert f'{shard}:b.jpg' in report and '1 unreadable' in report
    with pytest.raises(DataError, match='s.tar:b.jpg'):
        ShardDataset([str(shard)], on_bad_image='error')[1]


def test_finetuning_samples_without_a_label_stop_or_are_left_out(tmp_path, caplog):
    shard = _write_tar(
        tmp_path / 's.tar',
        [
            ('a.jpg', _jpeg(0)),
            ('a.cls', b'0'),
            ('b.jpg', _jpeg(1)),
            ('c.jpg', _jpeg(2)),
            ('c.cls', b'1'),
        ],
    )
    with pytest.raises(DataError, match=r'1 of the 3 samples have no label.*s.tar:b.jpg'):
        ShardDataset([str(shard)], on_bad_image='error', require_labels=True)
    with caplog.at_level(logging.WARNING, logger='simmim.data'):
        dataset = ShardDataset([str(shard)], require_labels=True)
    assert [dataset[i][1] for i in range(len(dataset))] == [0, 1] and 'left out' in caplog.text
    assert str(dataset.samples[1][0]).endswith('s.tar:c.jpg')
    assert ShardDataset([str(shard)])[1][1] == -1  # pre-training needs no label


def test_paths_without_shards_name_the_path_and_the_fix(tmp_path, folder_and_shards):
    with pytest.raises(DataError, match=r'2 of the 2 shards named do not exist.*make_shards'):
        find_shards(str(tmp_path / 'x-{0..1}.tar'))
    with pytest.raises(DataError, match='Fine-tuning reads two splits'):
        find_shards(str(tmp_path / 'x-{0..1}.tar'), 'train')
    only_train = tmp_path / 'only'
    only_train.mkdir()
    for shard in folder_and_shards[1].glob('*-train-*.tar'):
        os.symlink(shard, only_train / shard.name)
    with pytest.raises(DataError, match='No val shards found') as err:
        build_finetune_data(_config(tmp_path, only_train, False))
    assert str(only_train) in str(err.value) and exit_code_of(err.value) == 2


def _count_file_system_calls(monkeypatch, folder):
    """{'listings': listings of `folder`, 'stats': {shard name: os.stat calls}} from now on."""
    counts = {'listings': 0, 'stats': {}}
    real_scandir, real_listdir, real_stat = os.scandir, os.listdir, os.stat

    def listing(real):
        def counted(path='.'):
            counts['listings'] += os.path.realpath(path) == str(folder)
            return real(path)

        return counted

    def stat(path, *args, **kwargs):
        if str(path).endswith('.tar'):
            name = os.path.basename(path)
            counts['stats'][name] = counts['stats'].get(name, 0) + 1
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, 'scandir', listing(real_scandir))
    monkeypatch.setattr(os, 'listdir', listing(real_listdir))
    monkeypatch.setattr(os, 'stat', stat)
    return counts


def test_a_start_lists_the_shard_folder_once_and_stats_each_shard_once(
    tmp_path, folder_and_shards, monkeypatch
):
    folder = tmp_path / 'shards'
    shutil.copytree(folder_and_shards[1], folder)
    config = _config(tmp_path, folder, is_pretrain=False)
    log = logging.getLogger('test')
    for split in ('train', 'val'):  # the first start writes the set indexes
        _image_source(config, log, split)
    hour_ago = os.stat(folder).st_mtime_ns - 3600 * 10**9
    os.utime(folder, ns=(hour_ago, hour_ago))  # a data set folder is not written as it is read
    counts = _count_file_system_calls(monkeypatch, folder)
    datasets = [_image_source(config, log, split) for split in ('train', 'val')]  # fine-tuning
    monkeypatch.undo()
    names = sorted(p.name for p in folder.glob('*.tar'))
    assert sorted(n for d in datasets for n in d.shard_names) == names and len(names) == 6
    assert counts == {'listings': 1, 'stats': {name: 1 for name in names}}
    assert [len(d) for d in datasets] == [12, 5]
    assert datasets[0].fingerprint['shards'][0][1] == os.path.getsize(folder / names[0])


def test_shards_added_to_a_folder_already_listed_are_found(tmp_path):
    folder = tmp_path / 'shards'
    folder.mkdir()
    _write_tar(folder / 'a.tar', [('x.jpg', _jpeg(0))])
    assert find_shards(str(folder))[0] == [str(folder / 'a.tar')]
    before = os.stat(folder).st_mtime_ns
    _write_tar(folder / 'b.tar', [('x.jpg', _jpeg(1))])
    os.utime(folder, ns=(before, before))  # as when both land within one tick of the clock
    assert find_shards(str(folder))[0] == [str(folder / 'a.tar'), str(folder / 'b.tar')]
    hour_ago = before - 3600 * 10**9
    os.utime(folder, ns=(hour_ago, hour_ago))
    assert len(find_shards(str(folder))[0]) == 2  # listed now, and kept
    _write_tar(folder / 'c.tar', [('x.jpg', _jpeg(2))])  # the folder's time moves on
    assert [os.path.basename(s) for s in find_shards(str(folder))[0]] == ['a.tar', 'b.tar', 'c.tar']


# ------------------------------------------------------------------------------------------------
# The fingerprint a checkpoint records
# ------------------------------------------------------------------------------------------------
def test_resume_on_a_changed_shard_set_is_refused(tmp_path, folder_and_shards):
    shards = sorted(str(s) for s in folder_and_shards[1].glob('*-train-*.tar'))
    recorded = ShardDataset(shards).fingerprint
    model = torch.nn.Linear(2, 2)
    state = TrainingState(model, torch.optim.SGD(model.parameters(), 0.1), None)
    state.data_fingerprint = ShardDataset(shards).fingerprint
    state.load_counters({'global_update': 3, 'data': recorded}, 0.0)  # the same set: fine
    assert state.global_update == 3 and state.counters()['data'] == recorded
    state.data_fingerprint = ShardDataset(shards[:-1]).fingerprint
    with pytest.raises(DataError, match='shard set changed') as err:
        state.load_counters({'data': recorded}, 0.0)
    assert 'folder-train-0003.tar' in str(err.value) and exit_code_of(err.value) == 2
    check_fingerprint(None, recorded)  # checkpoints of folder runs, or older ones: no check


def test_device_decoding_hands_over_the_same_bytes_plans_and_masks_from_shards(
    tmp_path, folder_and_shards
):
    """DATA.DECODE gpu reads shard members like files: the workers' share (the encoded JPEG, the
    crop plan, the mask) is the folder's, and the batch decodes on the CPU as on the GPU."""
    folder, shards = folder_and_shards
    on_folder = build_pretrain_data(_config(tmp_path, folder / 'train'), 4).train_set
    on_shards = build_pretrain_data(_config(tmp_path, shards / 'folder-train-{0000..0003}.tar'), 4)
    on_shards = on_shards.train_set
    encoded = [
        EncodedMaskedImageDataset(d.base, d.transform, d.mask_generator, d.seed)
        for d in (on_folder, on_shards)
    ]
    for index in range(len(on_folder)):
        (item_a, plan_a, mask_a, _), (item_b, plan_b, mask_b, _) = (e[(2, index)] for e in encoded)
        assert torch.equal(item_a.data, item_b.data) and torch.equal(plan_a, plan_b)
        assert torch.equal(mask_a, mask_b) and isinstance(item_b.path, ShardMember)
    datas, paths, plans, _, _ = collate_encoded([encoded[1][(2, i)] for i in range(2)])
    assert decode_batch(datas, paths, plans, 16, 'cpu').shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    'tar_format', [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
)
def test_the_fast_header_reader_agrees_with_tarfile(tmp_path, tar_format):
    long_folder = 'folder_' * 20  # past the 100 bytes of a name: ustar's prefix, GNU/pax records
    members = [
        (f'{long_folder}/k{i}.{ext}', _jpeg(i) if ext == 'jpg' else str(i).encode())
        for i in range(3)
        for ext in ('jpg', 'cls')
    ] + [('short.png', b'p' * 600), ('ünïcode.jpg', b'u' * 10)]
    shard = tmp_path / 'f.tar'
    with tarfile.open(shard, 'w', format=tar_format) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    fast = index_module.build_index(str(shard))
    with open(shard, 'rb') as f:
        plain = index_module._index_members(f, shard.stat().st_size, tarfile_members(f))
    assert fast == plain and fast[0][3:] == ['short.png', 'ünïcode.jpg'] and fast[4] == ''
    assert fast[3] == [0, 1, 2, -1, -1]
