"""tools/export.py around the conversion itself: official checkpoints, the pickle-free safetensors
checkpoint, MODEL.PRETRAINED timm:..., and bad input (tests/test_timm_interop.py covers the
timm conversion of each architecture)."""

import copy
import json
import os
import re
import stat
import sys
import types

import pytest
import timm
import torch
from yacs.config import CfgNode

import checkpoint.timm_folder
import main_simmim
import utils.safetensors_io
from checkpoint.layout import verify_checkpoint
from checkpoint.weights import load_pretrained
from config import load_config_text
from engine.evaluation import load_eval_weights
from engine.launch import run
from models import build_model
from tests.conftest import ROOT
from tests.test_timm_interop import CONFIGS, images, randomize, relative_difference
from tools.export import main as export
from tools.import_timm import main as import_timm
from utils.errors import CheckpointError
from utils.safe_load import load_checkpoint_file
from utils.safetensors_io import is_safetensors_file

pytestmark = pytest.mark.usefixtures('single_thread')


def official_checkpoint(tmp_path, name='swin'):
    """A pre-training checkpoint as the official code saves it: the SimMIM state dict with the
    index and mask buffers, optimizer state, and the config as a pickled yacs CfgNode."""
    config = load_config_text(CONFIGS[name], is_pretrain=True)
    model = randomize(build_model(config))
    state = dict(model.state_dict())
    state.update(
        {
            k: v
            for k, v in model.named_buffers()
            if k.endswith(('relative_position_index', 'relative_coords_table', 'attn_mask'))
            and v is not None
        }
    )
    state = {k.replace('cpb_mlp', 'rpe_mlp'): v for k, v in state.items()}  # released SwinV2 names
    arch = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'vit': 'VIT'}[name]
    cfg = CfgNode(
        {
            'MODEL': CfgNode(
                {
                    'TYPE': name,
                    'NAME': 'simmim_pretrain',
                    'NUM_CLASSES': 1000,
                    arch: CfgNode(
                        {
                            k: (tuple(v) if isinstance(v, list) else v)
                            for k, v in config.MODEL[arch].items()
                        }
                    ),
                }
            ),
            'DATA': CfgNode({'IMG_SIZE': config.DATA.IMG_SIZE, 'MASK_PATCH_SIZE': 16}),
            'TRAIN': CfgNode({'OPTIMIZER': CfgNode({'BETAS': (0.9, 0.999)})}),
            'FUSED_WINDOW_PROCESS': False,  # a Swin-Transformer-repo key this framework lacks
        }
    )
    path = str(tmp_path / f'official_{name}.pth')
    torch.save(
        {
            'model': state,
            'optimizer': {},
            'lr_scheduler': {},
            'max_accuracy': 0.0,
            'epoch': 99,
            'config': cfg,
        },
        path,
    )
    return config, model, path


@pytest.mark.parametrize('name', ['swin', 'swinv2'])
def test_official_checkpoint_with_pickled_cfgnode_exports_without_running_its_code(
    tmp_path, monkeypatch, name
):
    config, model, path = official_checkpoint(tmp_path, name)
    ran = []

    class Trap(dict):
        def __new__(cls, *args, **kwargs):
            ran.append(cls)
            return dict.__new__(cls)

    # An unpickler that imports the pickled class finds yacs.config in sys.modules and would
    # build a Trap (torch.load(weights_only=False) does: 2 Traps for this file). Code that
    # imported yacs earlier keeps the real module.
    trapped = types.ModuleType('yacs.config')
    trapped.CfgNode = Trap
    monkeypatch.setitem(sys.modules, 'yacs.config', trapped)
    assert export([path, '--to', 'timm', str(tmp_path / 'timm')]) == 0
    assert not ran, 'the pickled config was rebuilt as a class instance'
    timm_model = timm.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True).eval()
    x = images(config)
    grid = config.DATA.IMG_SIZE // model.encoder.patch_size
    with torch.no_grad():
        expected = model.eval().encoder(x, torch.zeros(2, grid, grid)).permute(0, 2, 3, 1)
        assert relative_difference(timm_model.forward_features(x), expected) < 1e-5


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f'touch {_RunsCode.marker}',))


def test_checkpoint_that_would_run_code_is_refused_by_export(tmp_path, capsys):
    _RunsCode.marker = str(tmp_path / 'code_ran')
    path = str(tmp_path / 'evil.pth')
    torch.save({'model': {}, 'config': CfgNode({'MODEL': CfgNode()}), 'payload': _RunsCode()}, path)
    assert export([path, '--to', 'timm', str(tmp_path / 'out')]) == 2
    assert 'refused to load' in capsys.readouterr().err
    assert not os.path.exists(_RunsCode.marker) and not os.path.exists(tmp_path / 'out')


# -----------------------------------------------------------------------------------------------
# --to safetensors: our layout without pickle
# -----------------------------------------------------------------------------------------------
FINETUNE_VIT = CONFIGS['vit_rpb'].replace('MODEL:\n', 'MODEL:\n  NUM_CLASSES: 3\n', 1)


def finetuning_start(pretrained_path):
    """The state of a fresh fine-tuning ViT (per-block tables from the shared one) after
    load_pretrained(pretrained_path)."""
    config = load_config_text(FINETUNE_VIT)
    config.defrost()
    config.MODEL.PRETRAINED = pretrained_path
    torch.manual_seed(0)
    model = build_model(config, is_pretrain=False)
    load_pretrained(config, model)
    return model.state_dict()


@pytest.mark.parametrize('source', ['ours', 'official'])
def test_safetensors_export_gives_the_same_finetuning_start_as_the_pth(tmp_path, source):
    if source == 'official':
        _, _, path = official_checkpoint(tmp_path, 'vit')
    else:
        config = load_config_text(CONFIGS['vit'], is_pretrain=True)
        path = str(tmp_path / 'ckpt.pth')
        torch.save(
            {
                'model': randomize(build_model(config)).state_dict(),
                'config': config.dump(),
                'epoch': 4,
            },
            path,
        )
    out = str(tmp_path / 'ckpt.safetensors')
    assert export([path, '--to', 'safetensors', out]) == 0
    from_pth, from_safetensors = finetuning_start(path), finetuning_start(out)
    assert from_pth.keys() == from_safetensors.keys()
    assert all(torch.equal(from_pth[k], from_safetensors[k]) for k in from_pth)
    fresh = build_model(load_config_text(FINETUNE_VIT), is_pretrain=False).state_dict()
    assert not torch.equal(fresh['blocks.0.attn.qkv.weight'], from_pth['blocks.0.attn.qkv.weight'])


def test_export_of_an_export_keeps_the_output_folder_and_the_learning_rates(tmp_path):
    # checkpoint -> export -> export: the config each file stores reads back as the run's own,
    # with --opts (which re-reads the stored config) and without (kept verbatim).
    config = load_config_text(CONFIGS['swin'], is_pretrain=True)
    derived = (config.OUTPUT, config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR)
    path = str(tmp_path / 'ckpt.pth')
    torch.save(
        {
            'model': randomize(build_model(config)).state_dict(),
            'config': config.dump(),
            'optimizer': {},
        },
        path,
    )
    for opts in ([], ['--opts', 'PRINT_FREQ', '7']):
        source = path
        for step in range(2):
            out = str(tmp_path / f'export{len(opts)}_{step}.safetensors')
            assert export([source, '--to', 'safetensors', out, *opts]) == 0
            stored = load_config_text(load_checkpoint_file(out)['config'], is_pretrain=True)
            assert (
                stored.OUTPUT,
                stored.TRAIN.BASE_LR,
                stored.TRAIN.WARMUP_LR,
                stored.TRAIN.MIN_LR,
            ) == derived
            source = out


def test_safetensors_checkpoint_keeps_weights_config_and_scalars_without_pickle(tmp_path):
    config = load_config_text(CONFIGS['swin'], is_pretrain=True)
    state = randomize(build_model(config)).state_dict()
    path, out = str(tmp_path / 'ckpt.pth'), str(tmp_path / 'renamed.bin')
    torch.save({'model': state, 'config': config.dump(), 'epoch': 4, 'optimizer': {}}, path)
    assert export([path, '--to', 'safetensors', out]) == 0
    with open(out, 'rb') as f:
        header_size = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(header_size))
    assert header['__metadata__']['config'] == config.dump()  # JSON header + raw tensor bytes
    assert is_safetensors_file(out)  # recognised by content, whatever the file name
    loaded = load_checkpoint_file(out)
    assert loaded['epoch'] == 4 and loaded['config'] == config.dump()
    assert loaded['model'].keys() == state.keys()
    assert all(torch.equal(loaded['model'][k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match='lacks optimizer.*--pretrained'):
        verify_checkpoint(out)  # weights only: not a training resume


def test_eval_resume_reads_the_model_part_of_a_safetensors_checkpoint(tmp_path):
    config = load_config_text(FINETUNE_VIT)
    model = randomize(build_model(config, is_pretrain=False))
    path, out = str(tmp_path / 'model_best.pth'), str(tmp_path / 'model_best.safetensors')
    torch.save({'model': model.state_dict(), 'config': config.dump(), 'accuracy': 71.5}, path)
    assert export([path, '--to', 'safetensors', out]) == 0
    config.defrost()
    config.MODEL.RESUME = out
    fresh = build_model(config, is_pretrain=False)
    checkpoint = load_eval_weights(config, fresh, logger=_NullLogger())
    assert checkpoint['accuracy'] == 71.5
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


class _NullLogger:
    def info(self, message):
        pass


# -----------------------------------------------------------------------------------------------
# MODEL.PRETRAINED timm:...
# -----------------------------------------------------------------------------------------------
def test_pretrained_timm_folder_gives_the_same_start_as_the_checkpoint_it_came_from(tmp_path):
    config = load_config_text(CONFIGS['vit'], is_pretrain=True)
    path = str(tmp_path / 'ckpt.pth')
    torch.save(
        {'model': randomize(build_model(config)).state_dict(), 'config': config.dump()}, path
    )
    assert export([path, '--to', 'timm', str(tmp_path / 'timm')]) == 0
    from_pth, from_timm = finetuning_start(path), finetuning_start(f'timm:{tmp_path / "timm"}')
    assert all(torch.equal(from_pth[k], from_timm[k]) for k in from_pth)


def fake_hf_cache(cache, repo_id, state_dict):
    """The Hugging Face hub cache layout of one downloaded model.safetensors."""
    from safetensors.torch import save_file

    repo = cache / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / 'model.safetensors')
    )


def no_network(*args, **kwargs):
    raise AssertionError('tried to download')


def test_pretrained_timm_name_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', no_network)
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_url', no_network)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    name = 'vit_tiny_patch16_224'
    reference = randomize(timm.create_model(name))  # 1000 classes, as released
    fake_hf_cache(
        tmp_path / 'hub', timm.models.get_pretrained_cfg(name).hf_hub_id, reference.state_dict()
    )
    config = load_config_text(
        'MODEL:\n  TYPE: vit\n  NUM_CLASSES: 1000\n  VIT:\n    EMBED_DIM: 192\n    NUM_HEADS: 3\n'
        '    INIT_VALUES: null\n    USE_APE: True\n    USE_SHARED_RPB: False\n'
    )
    config.defrost()
    config.MODEL.PRETRAINED = f'timm:{name}'
    model = build_model(config, is_pretrain=False).eval()
    report = load_pretrained(config, model)
    assert not report.missing_keys and not report.unexpected_keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert relative_difference(model(x), reference(x)) < 1e-5


def test_pretrained_timm_name_not_in_the_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', no_network)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty'))
    config = load_config_text(CONFIGS['vit'])
    config.defrost()
    config.MODEL.PRETRAINED = 'timm:vit_tiny_patch16_224'
    with pytest.raises(CheckpointError, match='not in the local Hugging Face cache.*hf download'):
        load_pretrained(config, build_model(config, is_pretrain=False))


def test_pretrained_timm_model_of_another_architecture_is_refused(tmp_path):
    config = load_config_text(CONFIGS['swin'], is_pretrain=True)
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'model': build_model(config).state_dict(), 'config': config.dump()}, path)
    export([path, '--to', 'timm', str(tmp_path / 'timm')])
    vit = load_config_text(CONFIGS['vit'])
    vit.defrost()
    vit.MODEL.PRETRAINED = f'timm:{tmp_path / "timm"}'
    with pytest.raises(Exception, match='SwinTransformer, our MODEL.TYPE swin.*MODEL.TYPE vit'):
        load_pretrained(vit, build_model(vit, is_pretrain=False))


@pytest.mark.slow
def test_pretraining_starts_from_timm_weights(tmp_path):
    config = load_config_text(
        open(os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')).read()
    )
    source = randomize(build_model(config, is_pretrain=False))  # NUM_CLASSES 0: an encoder
    path = str(tmp_path / 'encoder.pth')
    torch.save({'model': source.state_dict(), 'config': config.dump()}, path)
    export([path, '--to', 'timm', str(tmp_path / 'timm')])
    # Learning rate 0: the weights stay what was loaded, so the checkpoint shows the start.
    argv = [
        '--cfg',
        os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml'),
        '--output',
        str(tmp_path / 'run'),
        '--opts',
        'TRAIN.EPOCHS',
        '1',
        'TRAIN.BASE_LR',
        '0.0',
        'TRAIN.WARMUP_LR',
        '0.0',
        'TRAIN.MIN_LR',
        '0.0',
        'MODEL.PRETRAINED',
        f'timm:{tmp_path / "timm"}',
    ]
    assert run(main_simmim.main, argv, is_pretrain=True) == 0
    saved = load_checkpoint_file(
        str(tmp_path / 'run' / 'simmim_pretrain' / 'tiny' / 'ckpt_epoch_0.pth')
    )['model']
    for key, value in source.state_dict().items():
        assert torch.equal(saved['encoder.' + key], value), key


# -----------------------------------------------------------------------------------------------
# Bad input: one paragraph, exit code 2, nothing lost
# -----------------------------------------------------------------------------------------------
def test_bad_input_gets_one_paragraph_and_exit_code_2(tmp_path, capsys):
    config = load_config_text(CONFIGS['swin'], is_pretrain=True)
    good = str(tmp_path / 'good.pth')
    torch.save({'model': build_model(config).state_dict(), 'config': config.dump()}, good)
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    torch.save(
        {
            'model': build_model(config).state_dict(),
            'config': config.dump().replace('TYPE: swin', 'TYPE: resnet'),
        },
        str(tmp_path / 'resnet.pth'),
    )
    (tmp_path / 'vit.yaml').write_text(CONFIGS['vit'])
    (tmp_path / 'file').write_text('')
    (tmp_path / 'shards').mkdir()
    out = str(tmp_path / 'out')
    cases = [
        ([str(tmp_path / 'missing.pth'), '--to', 'timm', out], 'file not found'),
        ([str(tmp_path / 'text.pth'), '--to', 'timm', out], 'not a readable PyTorch checkpoint'),
        ([str(tmp_path / 'resnet.pth'), '--to', 'timm', out], "MODEL.TYPE 'resnet'"),
        (
            [good, '--cfg', str(tmp_path / 'vit.yaml'), '--to', 'timm', out],
            'does not fit timm.*--cfg',
        ),
        ([good, '--to', 'timm', str(tmp_path / 'file' / 'out')], 'Cannot write to'),
        (
            [good, '--to', 'safetensors', str(tmp_path / 'file' / 'x.safetensors')],
            'Cannot write to',
        ),
        ([str(tmp_path / 'shards'), '--to', 'timm', out], 'is a folder, not a checkpoint file'),
    ]
    for argv, message in cases:
        assert export(argv) == 2, argv
        err = capsys.readouterr().err
        assert (
            re.match(r'(Configuration |Checkpoint |Data )?[Ee]rror: ', err)
            and 'Traceback' not in err
        )
        assert re.search(message, err), (message, err)
        assert not os.path.exists(out)  # a failed export leaves nothing behind


def test_failed_export_leaves_an_earlier_export_intact(tmp_path):
    config = load_config_text(CONFIGS['swin'], is_pretrain=True)
    good = str(tmp_path / 'good.pth')
    torch.save({'model': build_model(config).state_dict(), 'config': config.dump()}, good)
    out = tmp_path / 'timm'
    assert export([good, '--to', 'timm', str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    (tmp_path / 'vit.yaml').write_text(CONFIGS['vit'])
    assert export([good, '--cfg', str(tmp_path / 'vit.yaml'), '--to', 'timm', str(out)]) == 2
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def listing(folder):
    """{name: bytes} of every file under `folder`, hidden ones included."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(
            os.path.join(root, name), 'rb'
        ).read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def checkpoints_of_two_models(tmp_path):
    """Two checkpoints of the tiny Swin with other random weights: an earlier export, a new one."""
    config = load_config_text(CONFIGS['swin'], is_pretrain=True)
    paths = []
    for seed in (0, 1):
        path = str(tmp_path / f'model{seed}.pth')
        model = randomize(build_model(config), seed)
        torch.save({'model': model.state_dict(), 'config': config.dump()}, path)
        paths.append(path)
    return paths


def test_export_failing_its_verification_leaves_the_earlier_export_untouched(
    tmp_path, monkeypatch, capsys
):
    first, second = checkpoints_of_two_models(tmp_path)
    out = tmp_path / 'exports' / 'timm'
    assert export([first, '--to', 'timm', str(out)]) == 0
    before = listing(tmp_path / 'exports')
    real = checkpoint.timm_folder.save_for_hf

    def damaged(model, folder, **kwargs):  # what a disk or library fault would write
        broken = copy.deepcopy(model)
        with torch.no_grad():
            for p in broken.parameters():
                p.mul_(1.5)
        real(broken, folder, **kwargs)

    monkeypatch.setattr(checkpoint.timm_folder, 'save_for_hf', damaged)
    assert export([second, '--to', 'timm', str(out)]) == 1
    assert 'the export is wrong' in capsys.readouterr().err
    assert listing(tmp_path / 'exports') == before  # no file replaced, no staging folder left


def test_safetensors_export_failing_to_read_back_leaves_the_earlier_file(tmp_path, monkeypatch):
    first, second = checkpoints_of_two_models(tmp_path)
    out = tmp_path / 'exports' / 'model.safetensors'
    assert export([first, '--to', 'safetensors', str(out)]) == 0
    before = listing(tmp_path / 'exports')
    assert sorted(before) == ['model.safetensors', 'model.safetensors.checksum']
    real = utils.safetensors_io.serialize

    def damaged(tensors, metadata):
        return real(
            {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, metadata
        )

    monkeypatch.setattr(utils.safetensors_io, 'serialize', damaged)
    assert export([second, '--to', 'safetensors', str(out)]) == 1
    assert listing(tmp_path / 'exports') == before


@pytest.mark.parametrize('fmt, name', [('timm', 'timm'), ('safetensors', 'x.safetensors')])
def test_checkpoint_with_nonfinite_weights_is_bad_input_and_replaces_nothing(
    tmp_path, capsys, fmt, name
):
    first, second = checkpoints_of_two_models(tmp_path)
    out = tmp_path / 'exports' / name
    assert export([first, '--to', fmt, str(out)]) == 0
    before = listing(tmp_path / 'exports')
    damaged = torch.load(second, weights_only=True)
    damaged['model']['encoder.norm.weight'][3] = float('nan')
    damaged['model']['decoder.0.bias'][0] = float('inf')
    torch.save(damaged, second)
    assert export([second, '--to', fmt, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('Checkpoint error: ') and 'NaN or infinite' in err
    assert '2 tensors (encoder.norm.weight, decoder.' in err
    assert listing(tmp_path / 'exports') == before


def test_exported_files_get_the_permissions_of_the_umask(tmp_path):
    first, second = checkpoints_of_two_models(tmp_path)
    previous = os.umask(0o027)
    try:
        for path in (first, second):  # a new folder, then files replaced in an existing one
            assert export([path, '--to', 'timm', str(tmp_path / 'timm')]) == 0
            assert export([path, '--to', 'safetensors', str(tmp_path / 'x.safetensors')]) == 0
            assert import_timm([str(tmp_path / 'timm'), str(tmp_path / 'y.pth')]) == 0
            modes = {
                name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
                for name in (
                    'timm',
                    'timm/config.json',
                    'timm/model.safetensors',
                    'x.safetensors',
                    'x.safetensors.checksum',
                    'y.pth',
                    'y.pth.checksum',
                )
            }
            assert modes == {
                'timm': 0o750,
                'timm/config.json': 0o640,
                'timm/model.safetensors': 0o640,
                'x.safetensors': 0o640,
                'x.safetensors.checksum': 0o640,
                'y.pth': 0o640,
                'y.pth.checksum': 0o640,
            }
    finally:
        os.umask(previous)


def test_pretrained_timm_folder_or_cached_name_with_a_truncated_file_names_it(
    tmp_path, monkeypatch
):
    first, _ = checkpoints_of_two_models(tmp_path)
    folder = tmp_path / 'timm'
    assert export([first, '--to', 'timm', str(folder)]) == 0
    weights = folder / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:-1000])
    config = load_config_text(CONFIGS['swin'])
    config.defrost()
    config.MODEL.PRETRAINED = f'timm:{folder}'
    with pytest.raises(CheckpointError, match=f'{re.escape(str(weights))}.*truncated or damaged'):
        load_pretrained(config, build_model(config, is_pretrain=False))
    # A timm name whose weights in the Hugging Face cache were cut short by a download.
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', no_network)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    name = 'vit_tiny_patch16_224'
    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    fake_hf_cache(tmp_path / 'hub', hub_id, timm.create_model(name).state_dict())
    (cached,) = (tmp_path / 'hub').rglob('model.safetensors')
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    config.MODEL.PRETRAINED = f'timm:{name}'
    with pytest.raises(CheckpointError, match=f'{re.escape(str(cached))}.*truncated or damaged'):
        load_pretrained(config, build_model(config, is_pretrain=False))


def test_an_output_of_the_wrong_kind_is_a_usage_error(tmp_path, capsys):
    first, _ = checkpoints_of_two_models(tmp_path)
    (tmp_path / 'folder.safetensors').mkdir()
    (tmp_path / 'file').write_text('mine')
    assert export([first, '--to', 'safetensors', str(tmp_path / 'folder.safetensors')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('Configuration error: ') and 'is an existing folder' in err
    assert 'disk' not in err and os.listdir(tmp_path / 'folder.safetensors') == []
    assert export([first, '--to', 'timm', str(tmp_path / 'file')]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith('Configuration error: ')
        and 'is a file, but a timm export is a folder' in err
    )
    assert (tmp_path / 'file').read_text() == 'mine'
