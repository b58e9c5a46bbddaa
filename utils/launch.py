"""What both entry scripts do before and around training: config, process group, output folder,
logger, TensorBoard, and turning known failures into one clear paragraph and an exit code."""
import os
import sys

import torch

from config import ConfigError, build_arg_parser, get_config
from logger import create_logger
from utils.checkpoint import CheckpointWriteError
from utils.distributed import cleanup, init_distributed, seed_everything
from data.datasets import DataError
from utils.engine import NonFiniteLossError
from utils.preemption import Preempted
from utils.pretrained import IncompatibleCheckpointError
from utils.safe_load import CheckpointError

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def prepare_output_dir(path):
    """Create `path` and prove it is writable, or raise a ConfigError saying how to fix it."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write_test_{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"Cannot write to the output folder {path}: {e.strerror or e}. Pass "
                          f"--output (or OUTPUT) pointing to a writable folder.") from None


def setup(argv, is_pretrain):
    """Parse `argv`, build the frozen config, join the process group, prepare OUTPUT and logging.

    Returns (config, dist_info, logger, writer); `writer` is a TensorBoard SummaryWriter on rank 0
    when TENSORBOARD is on, else None.
    """
    args = build_arg_parser(finetune=not is_pretrain).parse_args(argv)
    config = get_config(args, is_pretrain=is_pretrain)
    dist_info = init_distributed(config.LOCAL_RANK)
    prepare_output_dir(config.OUTPUT)
    seed_everything(config.SEED + dist_info.rank)
    torch.backends.cudnn.benchmark = True
    logger = create_logger(config.OUTPUT, dist_info.rank, config.MODEL.NAME)
    logger.info(f'RANK {dist_info.rank} WORLD_SIZE {dist_info.world_size} device {dist_info.device}')
    writer = None
    if dist_info.is_main:
        path = os.path.join(config.OUTPUT, 'config.yaml')
        with open(path, 'w') as f:
            f.write(config.dump())
        logger.info(f'Full config saved to {path}')
        logger.debug(config.dump())
        if config.TENSORBOARD:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(log_dir=os.path.join(config.OUTPUT, 'tensorboard'))
    return config, dist_info, logger, writer


# Failures that have a clear message of their own: shown without a traceback.
_KNOWN = (ConfigError, CheckpointError, CheckpointWriteError, IncompatibleCheckpointError,
          DataError, NonFiniteLossError, Preempted, FileNotFoundError, NotADirectoryError)


def _message(error):
    """The error's own message; for one re-raised from a DataLoader worker, without the worker's
    traceback (its last line holds the original message)."""
    text = str(error)
    if 'Original Traceback' in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text


def run(main_fn, argv=None, is_pretrain=True):
    """Call main_fn(config, dist_info, logger, writer) and map failures to exit codes:
    0 done, 1 failed, 2 configuration/usage error, 3 too many non-finite steps, 75 preempted."""
    logger = None
    writer = None
    try:
        config, dist_info, logger, writer = setup(argv, is_pretrain)
        main_fn(config, dist_info, logger, writer)
        return 0
    except _KNOWN as e:
        code = getattr(e, 'exit_code', EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_FAILURE)
        title = {EXIT_CONFIG: 'Configuration error', 75: 'Preempted'}.get(code, 'Error')
        message = f'{title}: {_message(e)}'
        if logger is not None:
            (logger.warning if code == 75 else logger.error)(message)
        if logger is None or os.environ.get('RANK', '0') != '0':
            print(message, file=sys.stderr)
        return code
    finally:
        if writer is not None:
            writer.close()
        cleanup()
