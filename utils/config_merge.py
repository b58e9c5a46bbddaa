"""Merging YAML files and `--opts` into a config, checking every key and type on the way.

    merge_yaml(config, cfg_file)            BASE files first (recursively, relative to the YAML),
                                            then the file
    merge_yaml_text(config, text, source)   the same for YAML text (a checkpoint's config)
    merge_opts(config, opts)                KEY VALUE pairs from the command line

An unknown key is an error that suggests the closest valid keys; a value of the wrong type is an
error naming the expected type. Official SimMIM and Swin-Transformer YAML files load unchanged.
"""

import difflib
import os

import yaml
from yacs.config import CfgNode as CN

from utils.errors import ConfigError


def _all_keys(node, prefix=''):
    keys = []
    for k, v in node.items():
        full = prefix + k
        keys.append(full)
        if isinstance(v, CN):
            keys.extend(_all_keys(v, full + '.'))
    return keys


def _unknown_key_error(full_key, source, root):
    candidates = _all_keys(root)
    close = difflib.get_close_matches(full_key, candidates, n=3, cutoff=0.6)
    leaf = full_key.split('.')[-1]
    close += [k for k in candidates if k.split('.')[-1] == leaf and k not in close][:3]
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    return ConfigError(
        f"Unknown config key '{full_key}' (from {source}).{hint} "
        f'Valid keys are the defaults in config.py; fix or remove the key.'
    )


def _coerce(value, default, full_key, source):
    """Return `value` converted to the type of `default`, or raise a ConfigError."""
    if isinstance(value, str) and not isinstance(default, str):
        value = CN._decode_cfg_value(value)  # YAML reads 1e-4 (no dot) as a string, as yacs does
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif type(value) is type(default):
        return value
    raise ConfigError(
        f"Config key '{full_key}' (from {source}) expects a value like "
        f'{default!r} ({type(default).__name__}), got {value!r} '
        f"({type(value).__name__}). Fix the value's type."
    )


def _merge_dict(node, data, source, prefix='', root=None):
    root = node if root is None else root
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of config keys at '{prefix or 'top level'}', "
            f'got {type(data).__name__}.'
        )
    for key, value in data.items():
        full_key = prefix + str(key)
        if key not in node:
            raise _unknown_key_error(full_key, source, root)
        if isinstance(node[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"Config key '{full_key}' (from {source}) is a group; give it a "
                    f'mapping of sub-keys, not {value!r}.'
                )
            _merge_dict(node[key], value, source, full_key + '.', root)
        else:
            node[key] = _coerce(value, node[key], full_key, source)


def merge_yaml(config, cfg_file, _stack=()):
    """Merge the YAML `cfg_file` into `config`: its BASE files first (recursively, paths relative to
    the file that lists them), then the file itself."""
    cfg_file = os.path.abspath(cfg_file)
    if not os.path.isfile(cfg_file):
        raise ConfigError(
            f'Config file not found: {cfg_file}. Check the --cfg path (or a BASE '
            f'entry, which is relative to the YAML that lists it).'
        )
    if cfg_file in _stack:
        raise ConfigError(f'BASE inheritance cycle: {" -> ".join(_stack + (cfg_file,))}')
    with open(cfg_file) as f:
        _merge_yaml_data(config, f, cfg_file, os.path.dirname(cfg_file), _stack + (cfg_file,))


def merge_yaml_text(config, text, source):
    """Merge YAML `text` (e.g. a checkpoint's stored config) into `config`; `source` names it in
    errors, and BASE entries in it are relative to the working directory."""
    _merge_yaml_data(config, text, source, os.getcwd(), ())


def _merge_yaml_data(config, stream, source, folder, stack):
    try:
        data = yaml.safe_load(stream) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'Cannot parse YAML {source}: {e}') from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of config keys at 'top level', got "
            f'{type(data).__name__}.'
        )
    bases = data.pop('BASE', ['']) or []
    for base in [bases] if isinstance(bases, str) else bases:  # one file may be given bare
        if base:
            merge_yaml(config, os.path.join(folder, base), stack)
    _merge_dict(config, data, source)


def merge_opts(config, opts):
    """Merge `--opts KEY VALUE ...` into `config` (values decoded as yacs does)."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f'--opts takes KEY VALUE pairs; got an odd number of items: {opts}')
    for full_key, raw in zip(opts[0::2], opts[1::2], strict=True):
        value = CN._decode_cfg_value(raw) if isinstance(raw, str) else raw
        node, parts = config, full_key.split('.')
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key_error(full_key, '--opts', config)
            node = node[part]
        data = value
        for part in reversed(parts[1:]):
            data = {part: data}
        _merge_dict(config, {parts[0]: data}, '--opts')
