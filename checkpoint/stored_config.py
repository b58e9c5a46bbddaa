"""What a checkpoint holds, whoever wrote it: its config and its encoder's weights.

    checkpoint_config(checkpoint, cfg_path=None, opts=(), is_pretrain=False)   the frozen config
    load_config_text(yaml_text, opts=(), is_pretrain=False)                    from YAML text
    encoder_weights(checkpoint) -> (state_dict, dropped keys)                  under our names
    num_classes_of(state_dict)                                                 0 for an encoder

Our checkpoints store the config as YAML text; official ones pickle a yacs CfgNode, which
utils.safe_load reads as a plain dict (never rebuilding the class). Only its MODEL, DATA and TEST
sections are used here (what defines the model and its evaluation transform), and keys this
framework does not know (the Swin-Transformer repo has a few more) are left out.
"""
import os
import re
import tempfile

import yaml
from yacs.config import CfgNode

from config import get_defaults, load_config
from utils.errors import ConfigError
from utils.state_dict import (drop_rebuilt_buffers, rename_released_keys, strip_prefixes,
                              unwrap_state_dict)

OFFICIAL_SECTIONS = ('MODEL', 'DATA', 'TEST')


def load_config_text(yaml_text, opts=(), is_pretrain=False):
    """The frozen config that YAML text (e.g. a checkpoint's) gives, with --opts applied."""
    with tempfile.NamedTemporaryFile('w', suffix='.yaml', delete=False) as f:
        f.write(yaml_text)
    try:
        return load_config(f.name, opts, is_pretrain=is_pretrain)
    finally:
        os.remove(f.name)


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
        return load_config_text(stored, opts, is_pretrain)
    if isinstance(stored, dict):
        return load_config_text(official_config_yaml(stored), opts, is_pretrain)
    raise ConfigError(f"{source} stores no config. Pass the config it was trained with: --cfg FILE.")


def encoder_weights(checkpoint):
    """(state dict of the encoder or classifier under our names, names of what was left out).

    A SimMIM checkpoint's `encoder.` prefix is removed and its decoder and mask token are left
    out (both exist only for pre-training); so is a linear probe's head. DDP / torch.compile
    prefixes, buffers the model rebuilds and released SwinV2 names are normalised."""
    full = drop_rebuilt_buffers(unwrap_state_dict(checkpoint))
    weights = rename_released_keys(strip_prefixes(full))
    dropped = [k for k in full
               if re.sub(r'^((module|_orig_mod)\.)*(encoder\.)?', '', k).replace('rpe_mlp', 'cpb_mlp')
               not in weights]
    return weights, dropped


def num_classes_of(state_dict):
    """Outputs of the classifier head in `state_dict`; 0 for an encoder without one."""
    head = state_dict.get('head.weight')
    return int(head.shape[0]) if head is not None else 0

