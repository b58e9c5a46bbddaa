"""Mixed precision: the autocast dtype a run uses, its GradScaler, and the one autocast context.

AMP_OPT_LEVEL / ENABLE_AMP turn autocast on (on CUDA only) and AMP_DTYPE picks bf16 or fp16
(config.py); fp16 trains with a GradScaler, bf16 and fp32 without. Imports only torch, so the
benchmarks' rows of the official code can use it too.
"""

import torch


def amp_enabled(config):
    """Whether the config asks for autocast (on CUDA); see AMP_OPT_LEVEL / ENABLE_AMP."""
    return config.ENABLE_AMP and config.AMP_OPT_LEVEL != 'O0'


def autocast_dtype(config, device):
    """The autocast dtype for this run, or None for full precision (always None on the CPU)."""
    if device.type != 'cuda' or not amp_enabled(config):
        return None
    if config.AMP_DTYPE == 'auto':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, config.AMP_DTYPE)


def describe_autocast(config, device, dtype):
    """What the log says about autocast: the dtype, or why it is off."""
    if dtype is not None:
        return str(dtype)
    if amp_enabled(config) and device.type != 'cuda':
        return f'off (fp32): mixed precision is only used on CUDA, and this run is on {device.type}'
    return 'off (fp32)'


def build_grad_scaler(dtype):
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler('cuda') if dtype == torch.float16 else None


def autocast(device, dtype=None):
    """torch.autocast on `device` (a torch.device or its type) in `dtype`; off when None."""
    device_type = getattr(device, 'type', device)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
