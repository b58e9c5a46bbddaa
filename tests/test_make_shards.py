"""tools/make_shards.py: original bytes and labels in the folder's order, _info.json, bad files
left out, an interrupted conversion continued, another source refused."""

import json
import os
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from tools import make_shards
from tools.make_shards import convert, main
from utils.errors import DataError


def _folder(root, per_class=(3, 2, 4)):
    rng = np.random.default_rng(0)
    for name, count in zip(('ant', 'bee', 'cow'), per_class, strict=True):
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            pixels = (rng.random((12, 14, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f'p.{i}.JPEG')
    return root


def _members(shard):
    with tarfile.open(shard) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive]


def test_shards_hold_the_original_bytes_and_class_indices_in_folder_order(tmp_path, capsys):
    source = _folder(tmp_path / 'src')
    (source / 'bee' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    assert main([str(source), str(tmp_path / 'out'), '--shard-size', '4', '--workers', '1']) == 0
    printed = capsys.readouterr()
    assert 'broken.jpg' in printed.out and '1 files left out' in printed.out
    assert 'images/s' in printed.err  # the progress bar
    shards = sorted((tmp_path / 'out').glob('*.tar'))
    assert [s.name for s in shards] == [f'src-train-000{i}.tar' for i in range(3)]
    members = [m for s in shards for m in _members(s)]
    expected = []
    for label, name in enumerate(('ant', 'bee', 'cow')):
        for file in sorted(os.listdir(source / name)):
            if file != 'broken.jpg':
                key = f'{name}/{file.split(".")[0]}_{file.split(".")[1]}'
                expected += [
                    (f'{key}.jpeg', (source / name / file).read_bytes()),
                    (f'{key}.cls', str(label).encode()),
                ]
    assert members == expected
    info = json.loads((tmp_path / 'out' / '_info.json').read_text())
    assert info['classes'] == ['ant', 'bee', 'cow']
    split = info['splits']['train']
    assert split['num_samples'] == 9 and split['shard_lengths'] == [3, 4, 2]  # broken.jpg was 4th
    assert split['class_counts'] == {'ant': 3, 'bee': 2, 'cow': 4}
    assert [s[0] for s in info['skipped']] == [str(source / 'bee' / 'broken.jpg')]


def test_an_interrupted_conversion_continues_and_ends_as_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    source = _folder(tmp_path / 'src' / 'train')
    _folder(tmp_path / 'src' / 'val', per_class=(1, 1, 1))
    convert(str(tmp_path / 'src'), str(tmp_path / 'whole'), shard_size=2, log=lambda _: None)
    real_write = make_shards.write_shard
    calls = []

    def stop_at_the_third(path, *args):
        calls.append(path)
        if len(calls) == 3:
            with open(path + '.tmp', 'wb') as f:  # a shard half written when the stop came
                f.write(b'partial')
            raise KeyboardInterrupt
        return real_write(path, *args)

    monkeypatch.setattr(make_shards, 'write_shard', stop_at_the_third)
    out = tmp_path / 'resumed'
    with pytest.raises(KeyboardInterrupt):
        convert(str(tmp_path / 'src'), str(out), shard_size=2, log=lambda _: None)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob('*.tar')}
    assert sorted(finished) == ['src-train-0000.tar', 'src-train-0001.tar']
    monkeypatch.setattr(make_shards, 'write_shard', real_write)
    written = []
    monkeypatch.setattr(
        make_shards, 'write_shard', lambda path, *a: written.append(path) or real_write(path, *a)
    )
    convert(str(tmp_path / 'src'), str(out), shard_size=2, log=lambda _: None)
    assert all(os.path.basename(p) not in finished for p in written)  # finished ones kept
    assert {p.name: p.stat().st_mtime_ns for p in out.glob('*-train-000[01].tar')} == finished
    whole = sorted(p.name for p in (tmp_path / 'whole').glob('*.tar'))
    assert whole == sorted(p.name for p in out.glob('*.tar')) and len(whole) == 5 + 2
    for name in whole:
        assert (out / name).read_bytes() == (tmp_path / 'whole' / name).read_bytes()
    assert not list(out.glob('*.tmp'))
    info = json.loads((out / '_info.json').read_text())
    assert info == json.loads((tmp_path / 'whole' / '_info.json').read_text())
    assert list(info['splits']) == ['train', 'validation'] and info['source'] == str(source.parent)


def test_another_source_into_the_same_folder_is_refused(tmp_path):
    convert(str(_folder(tmp_path / 'a')), str(tmp_path / 'out'), shard_size=4, log=print)
    with pytest.raises(DataError, match='another source or with other settings'):
        convert(str(_folder(tmp_path / 'b', (1, 1, 1))), str(tmp_path / 'out'), 4, log=print)


def test_index_only_indexes_shards_written_elsewhere(tmp_path, capsys):
    convert(str(_folder(tmp_path / 'src')), str(tmp_path / 'out'), shard_size=4, log=print)
    for index in (tmp_path / 'out').glob('*.index.npz'):
        index.unlink()
    assert main(['--index-only', str(tmp_path / 'out'), '--workers', '1']) == 0
    assert 'indexed 3 shards, 9 samples' in capsys.readouterr().out
    assert len(list((tmp_path / 'out').glob('*.tar.index.npz'))) == 3


def test_a_shuffle_seed_mixes_classes_across_shards_keeping_bytes_and_labels(tmp_path):
    source = _folder(tmp_path / 'src')
    convert(str(source), str(tmp_path / 'in_order'), shard_size=3, log=print)
    convert(str(source), str(tmp_path / 'mixed'), shard_size=3, log=print, shuffle_seed=0)

    def members(out):
        return [m for s in sorted((tmp_path / out).glob('*.tar')) for m in _members(s)]

    in_order, mixed = members('in_order'), members('mixed')
    assert in_order != mixed and sorted(in_order) == sorted(mixed)
    pairs = dict(zip(mixed[::2], mixed[1::2], strict=True))  # (image, its .cls) stay together
    assert pairs == dict(zip(in_order[::2], in_order[1::2], strict=True))


def test_every_file_written_is_fsynced_under_a_temporary_name_then_renamed(tmp_path, fsynced):
    source = _folder(tmp_path / 'src')
    out = tmp_path / 'out'
    convert(str(source), str(out), shard_size=4, log=lambda _: None)
    written = sorted(os.listdir(out))
    assert written == [
        '_info.json',
        '_progress.json',
        *(f'src-train-000{i}{end}' for i in range(3) for end in ('.tar', '.tar.index.npz')),
    ]
    for name in written:  # the file's bytes, then its rename in the folder, reach the disk
        temporary = re.compile(re.escape(f'{out / name}.') + '[0-9a-f]{12}\\.tmp')
        assert any(temporary.fullmatch(p) for p in fsynced), name
    assert str(out) in fsynced


def test_each_image_is_read_once_and_a_broken_one_is_named_in_its_reason(tmp_path, monkeypatch):
    source = _folder(tmp_path / 'src', per_class=(2, 1, 1))
    (source / 'bee' / 'broken.jpg').write_bytes(b'not an image')
    opened, real_open = [], open

    def counting_open(file, *args, **kwargs):
        if str(file).startswith(str(source)):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr('builtins.open', counting_open)
    info = convert(str(source), str(tmp_path / 'out'), shard_size=10, log=lambda _: None)
    monkeypatch.undo()
    images = sorted(str(p) for p in source.rglob('*') if p.is_file())
    assert sorted(opened) == images and len(images) == 5  # once each, the broken one too
    [(file, reason)] = info['skipped']
    assert file == str(source / 'bee' / 'broken.jpg') and 'broken.jpg' in reason
    members = _members(tmp_path / 'out' / 'src-train-0000.tar')
    assert members[0] == ('ant/p_0.jpeg', (source / 'ant' / 'p.0.JPEG').read_bytes())
