"""The config a checkpoint was trained with, whoever wrote it.

    checkpoint_config(checkpoint, cfg_path=None, opts=(), is_pretrain=False)   the frozen config

Our checkpoints store the config as YAML text (read back as itself: config.load_config_text);
official ones pickle a yacs CfgNode, which utils.safe_load reads as a plain dict (never rebuilding
the class). Only its MODEL, DATA and TEST sections are used (what defines the model and its
evaluation transform), and keys this framework does not know (the Swin-Transformer repo has a few
more) are left out.
"""

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
