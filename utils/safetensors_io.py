"""Checkpoints as safetensors files: tensors and string metadata, no pickle at all.

    save_safetensors_checkpoint(path, state_dict, config_text='', info=None, verify=None)
                                                   atomic write (verify(tmp) before the rename)
    save_safetensors(path, state_dict, metadata, verify=None)   the same with any string metadata
    load_safetensors_checkpoint(path) -> {'model': state_dict, 'config': YAML text, **info}
    is_safetensors_file(path)                      by the header
    check_safetensors_file(path, what)             a CheckpointError for a truncated or damaged
                                                   file (its header and the extent it claims)

Our layout: the tensors are a checkpoint's 'model' state dict under its own names; the metadata
holds 'config' (the run's YAML text, as in our .pth checkpoints) and 'simmim' (JSON: format
version and the checkpoint's scalars such as epoch and accuracy). So the file reads back as the
dict a .pth checkpoint gives, minus optimizer and schedule state. A timm folder's
model.safetensors is the same container with timm's names and no such metadata.
"""

import json
import os
import struct

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from utils.atomic_write import atomic_save
from utils.errors import CheckpointError

FORMAT_VERSION = 1
SCALAR_KEYS = ('epoch', 'max_accuracy', 'accuracy', 'acc5')  # kept from a .pth checkpoint


def is_safetensors_file(path):
    """True when `path` starts like a safetensors file: an 8-byte little-endian header length that
    fits the file, then the JSON header's opening brace."""
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and 0 < struct.unpack('<Q', head[:8])[0] <= size - 8


def _without_shared_storage(state_dict):
    """safetensors refuses tensors that share memory (tied weights); such a tensor is copied."""
    seen, out = set(), {}
    for key, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        pointer = value.untyped_storage().data_ptr()
        if value.numel() and pointer in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def check_safetensors_file(path, what='safetensors file'):
    """Raise a CheckpointError naming `path` unless it opens as safetensors: a header that parses
    and tensors that fit in the file (a truncated copy fails here; the library reads nothing
    else until a tensor is asked for)."""
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise CheckpointError(
            f'{what} {path} ({size} bytes) is truncated or damaged: safetensors cannot read it '
            f'({detail}). The copy or download was probably interrupted: copy or download it '
            f'again.'
        ) from None


def save_safetensors_checkpoint(path, state_dict, config_text='', info=None, verify=None):
    """Write `state_dict` with the config YAML text and JSON-able scalars `info` to `path`,
    atomically (utils.atomic_write.atomic_save; `verify(tmp)` checks the written file before it
    replaces `path`)."""
    metadata = {'simmim': json.dumps({'format_version': FORMAT_VERSION, **(info or {})})}
    if config_text:
        metadata['config'] = config_text
    save_safetensors(path, state_dict, metadata, verify)


def save_safetensors(path, state_dict, metadata, verify=None):
    """Write `state_dict` (tensors sharing memory copied apart) with the string dict `metadata` to
    `path`, atomically and with a checksum record beside it (utils.atomic_write.atomic_save)."""
    data = serialize(_without_shared_storage(state_dict), metadata=metadata)
    atomic_save(data, path, write=lambda payload, f: f.write(payload), checksum=True, verify=verify)


def load_safetensors_checkpoint(path):
    """The checkpoint dict stored in `path`: {'model': state_dict} plus 'config' and the scalars
    when the file was written by save_safetensors_checkpoint. Raises the library's error for a
    file that is not valid safetensors."""
    with safe_open(path, framework='pt', device='cpu') as f:
        metadata = f.metadata() or {}
        checkpoint = {'model': {key: f.get_tensor(key) for key in f.keys()}}
    info = json.loads(metadata.get('simmim', '{}'))
    checkpoint.update({k: v for k, v in info.items() if k in SCALAR_KEYS})
    if 'config' in metadata:
        checkpoint['config'] = metadata['config']
    return checkpoint
