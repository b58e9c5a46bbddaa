"""What every benchmark here writes: the machine it ran on, and its markdown (+ JSON) results."""

import json
import os
import platform


def machine_description(device='cpu'):
    """CPU model, cores, Python and torch versions, and the GPU when `device` is 'cuda'."""
    import torch

    cpu = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    text = (
        f'{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch '
        f'{torch.__version__}'
    )
    if device == 'cuda':
        props = torch.cuda.get_device_properties(0)
        text = (
            f'{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}; '
            + text
        )
    return text


def write_report(lines, path=None, data=None):
    """Print the markdown `lines`; with `path`, also write them there and `data` as JSON beside."""
    text = '\n'.join(lines) + '\n'
    print(text)
    if path:
        with open(path, 'w') as f:
            f.write(text)
        if data is not None:
            with open(os.path.splitext(path)[0] + '.json', 'w') as f:
                json.dump(data, f, indent=1)
