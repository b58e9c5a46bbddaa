"""The compact conformance fixtures of tests/fixtures/ (see its README.md): official outputs of
tiny Swin, ViT and SwinV2 models whose weights and input images follow a seeded rule, which this
module recomputes.

    official_data(name)  the stored outputs plus the rule's weights and images, under the keys the
                         tests compare against (read-only: it is cached)
"""

import functools
import os
import tempfile
import zlib

import numpy as np
import torch

from config import load_config
from models import build_model
from tests.conftest import FIXTURES_DIR

NAMES = ('swin', 'vit', 'swinv2')


def rule_tensor(name, shape):
    """The rule's float32 value for parameter `name` (its official name without `encoder.`):
    N(0, 1) from NumPy's legacy stream seeded by crc32(name), as 1 + 0.1 t for norm weights and
    layer scales (so they stay near their usual value), else 0.02 t."""
    t = np.asarray(np.random.RandomState(zlib.crc32(name.encode())).standard_normal(shape))
    near_one = (len(shape) == 1 and name.endswith('.weight')) or name.rsplit('.', 1)[-1].startswith(
        'gamma'
    )
    return torch.from_numpy((1 + 0.1 * t if near_one else 0.02 * t).astype(np.float32))


def rule_state_dict(model):
    """{parameter name: rule value} for every parameter of `model` (buffers are the model's own)."""
    return {
        name: rule_tensor(name.removeprefix('encoder.'), tuple(p.shape))
        for name, p in model.named_parameters()
    }


def rule_images(seed, size):
    """The fixtures' input batch: (2, 3, size, size) float32 N(0, 1) from RandomState(seed)."""
    x = np.random.RandomState(seed).standard_normal((2, 3, size, size))
    return torch.from_numpy(x.astype(np.float32))


def load_compact(name):
    """The stored official outputs of fixture `name`; a missing file fails the test using it."""
    return torch.load(os.path.join(FIXTURES_DIR, f'{name}.pt'), weights_only=True)


def config_from_yaml(yaml_text, is_pretrain, opts=()):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'config.yaml')
        with open(path, 'w') as f:
            f.write(yaml_text)
        return load_config(path, list(opts), is_pretrain=is_pretrain)


def build_from_yaml(yaml_text, is_pretrain):
    """(config, freshly initialised model) of a fixture's pre-training or fine-tuning YAML."""
    config = config_from_yaml(yaml_text, is_pretrain)
    return config, build_model(config, is_pretrain=is_pretrain)


@functools.cache
def official_data(name):
    """The fixture's stored keys (README) plus:
    pretrain_state_dict  the rule-filled pre-training model (what the official code read)
    finetune_state_dict  the fine-tuning model after the official load_pretrained of it: the rule,
                         with the `finetune_changed` tensors in place
    x, x_ft              the input batches; `mask` as int64
    """
    data = dict(load_compact(name))
    pretrain_config, pretrain = build_from_yaml(data['pretrain_yaml'], True)
    finetune_config, finetune = build_from_yaml(data['finetune_yaml'], False)
    data['pretrain_state_dict'] = rule_state_dict(pretrain)
    finetune_state = rule_state_dict(finetune)
    changed = data['finetune_changed']
    assert changed.keys() <= finetune_state.keys(), sorted(changed.keys() - finetune_state.keys())
    assert all(finetune_state[k].shape == v.shape for k, v in changed.items())
    data['finetune_state_dict'] = dict(finetune_state, **changed)
    data['x'] = rule_images(data['x_seed'], pretrain_config.DATA.IMG_SIZE)
    data['x_ft'] = rule_images(data['x_ft_seed'], finetune_config.DATA.IMG_SIZE)
    data['mask'] = data['mask'].long()
    return data
