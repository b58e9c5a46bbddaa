"""The config a checkpoint was trained with, whoever wrote it.

    checkpoint_config(checkpoint, cfg_path=None, opts=(), is_pretrain=False)   the frozen config
    require_same_data(config, path, checkpoint)   auto-resume: the run found was on this data

Our checkpoints store the config as YAML text (read back as itself: config.load_config_text);
official ones pickle a yacs CfgNode, which utils.safe_load reads as a plain dict (never rebuilding
the class). Only its MODEL, DATA and TEST sections are used (what defines the model and its
evaluation transform), and keys this framework does not know (the Swin-Transformer repo has a few
more) are left out.
"""

import os

import yaml
from yacs.config import CfgNode

from config import get_defaults, load_config, load_config_text
from utils.errors import ConfigError

OFFICIAL_SECTIONS = ('MODEL', 'DATA', 'TEST')


def _known(data, defaults):
    """`data` (nested dicts) restricted to keys `defaults` has, tuples as lists (YAML-safe)."""
    out = {}
    for key, value in data.items():
        if key not in defaults:
            continue
        if isinstance(defaults[key], CfgNode):
            if isinstance(value, dict):
                out[key] = _known(value, defaults[key])
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def official_config_yaml(config_dict):
    """YAML text for the model-defining sections of an official checkpoint's config dict."""
    defaults = get_defaults()
    sections = {k: v for k, v in config_dict.items() if k in OFFICIAL_SECTIONS}
    return yaml.safe_dump(_known(sections, defaults))


def checkpoint_config(checkpoint, cfg_path=None, opts=(), is_pretrain=False, source='checkpoint'):
    """The config of `checkpoint`: `cfg_path` when given, else the one stored in it (ours: YAML
    text; official: the pickled CfgNode read as a dict). Raises ConfigError when there is none."""
    if cfg_path:
        return load_config(cfg_path, opts, is_pretrain=is_pretrain)
    stored = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    if isinstance(stored, str):
        return load_config_text(stored, opts, is_pretrain=is_pretrain, source=source)
    if isinstance(stored, dict):
        return load_config_text(
            official_config_yaml(stored), opts, is_pretrain=is_pretrain, source=source
        )
    raise ConfigError(
        f'{source} stores no config. Pass the config it was trained with: --cfg FILE.'
    )


def _data_source(dataset, data_path):
    """What a run trains on: the built-in set, or an image folder ('imagenet' and 'folder' both
    read DATA_PATH), its path resolved so that spellings of one folder agree."""
    if dataset == 'synthetic':
        return ('synthetic', '')
    return ('folder', os.path.realpath(os.path.expanduser(data_path)) if data_path else '')


def _same_source(old, new):
    """The same data: one kind, and one resolved path or the same last two components of it (the
    same folder staged elsewhere, e.g. to node-local scratch under a per-job path: a requeued job
    must continue; a new experiment names its data differently)."""
    if old[0] != new[0]:
        return False
    return old[1] == new[1] or _tail(old[1]) == _tail(new[1])


def _tail(path):
    return os.path.join(*path.split(os.sep)[-2:]) if path else ''


def _describe_data(dataset, data_path):
    if dataset == 'synthetic':
        return 'the built-in synthetic dataset (DATA.DATASET synthetic)'
    return f'the image folder {data_path or "(none given)"} (DATA.DATASET {dataset})'


def require_same_data(config, path, checkpoint):
    """Raise ConfigError when `checkpoint` (the dict auto-resume verified at `path`) was trained on
    other data (DATA.DATASET or DATA.DATA_PATH) than `config`: continuing it would train the old
    run's weights on new data, or declare a finished run done. A checkpoint without our stored
    config (official ones) cannot tell and passes."""
    stored = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    try:
        data = (yaml.safe_load(stored) or {}).get('DATA') if isinstance(stored, str) else None
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        return
    defaults = get_defaults().DATA
    old = (data.get('DATASET', defaults.DATASET), data.get('DATA_PATH', defaults.DATA_PATH))
    new = (config.DATA.DATASET, config.DATA.DATA_PATH)
    if _same_source(_data_source(*old), _data_source(*new)):
        return
    raise ConfigError(
        f'Auto-resume found {path} in {config.OUTPUT}, a run on {_describe_data(*old)}, but this '
        f"run is configured for {_describe_data(*new)}. Continuing it would train the old run's "
        f'weights on other data (or call that run finished), so nothing was started. Give this '
        f'experiment its own folder with --tag NEW_NAME (or --output DIR); to continue the old '
        f'run, use its data.'
    )
