"""What both entry scripts do before and around training: config, process group, output folder,
logger, the trackers (engine/tracking.py), and turning known failures into one clear paragraph
and an exit code."""

import os
import sys
from collections.abc import Callable, Sequence

import torch

from config import get_config
from engine.run_folder import release_output_folders, take_output_folder
from engine.tracking import build_tracker
from logger import create_logger
from utils.arguments import build_arg_parser
from utils.distributed import cleanup, init_distributed, seed_everything
from utils.errors import EXIT_PREEMPTED, KNOWN_ERRORS, ConfigError, exit_code_of, title_of
from utils.tasks import PRETRAIN, Task, as_task


def prepare_output_dir(path):
    """Create `path` and prove it is writable, or raise a ConfigError saying how to fix it."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write_test_{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f'Cannot write to the output folder {path}: {e.strerror or e}. Pass '
            f'--output (or OUTPUT) pointing to a writable folder.'
        ) from None


def prepare_output_file(path, what='the output file', suffixes=None):
    """Check that a tool can write the file `path` (not a folder; one of `suffixes`, when given)
    and create its folder, before any work; else raise a ConfigError saying what to pass."""
    if os.path.isdir(path):
        raise ConfigError(
            f'{what} {path} is an existing folder; pass a file path, e.g. '
            f'{os.path.join(path, "model" + (suffixes[0] if suffixes else ".pth"))}.'
        )
    if suffixes and not path.endswith(tuple(suffixes)):
        raise ConfigError(
            f'{what} {path}: the suffix says a format this tool does not write; name the file '
            f'with one of {", ".join(suffixes)}.'
        )
    prepare_output_dir(os.path.dirname(os.path.abspath(path)))


def setup(argv: Sequence[str] | None, task: Task) -> tuple:
    """Parse `argv` for `task` (utils.tasks), build the frozen config, join the process group,
    prepare OUTPUT and logging.

    Returns (config, dist_info, logger, writer); `writer` is an engine.tracking.Tracker on rank 0
    (metrics.jsonl, TensorBoard when TENSORBOARD is on, W&B when LOGGING.WANDB is), else None.
    """
    args = build_arg_parser(finetune=task.finetune_flags).parse_args(argv)
    notes = []  # what a flag changed besides its key, config_warnings: logged below
    config = get_config(args, task, notes=notes)
    dist_info = init_distributed(config.LOCAL_RANK)
    prepare_output_dir(config.OUTPUT)
    takeover = take_output_folder(config.OUTPUT, dist_info)  # before anything is written there
    seed_everything(config.SEED + dist_info.rank)
    torch.backends.cudnn.benchmark = True
    logger = create_logger(config.OUTPUT, dist_info.rank, config.MODEL.NAME)
    logger.info(
        f'RANK {dist_info.rank} WORLD_SIZE {dist_info.world_size} device {dist_info.device}'
    )
    logger.info(
        f'output folder {config.OUTPUT}: checkpoints (ckpt_epoch_*), config.yaml, '
        f'log_rank{dist_info.rank}.txt'
    )
    if takeover:
        logger.warning(takeover)
    for note in notes:
        logger.warning(note)
    writer = None
    if dist_info.is_main:
        logger.debug(config.dump())  # config.yaml is written once the run starts (record_config)
        writer = build_tracker(config, logger)
    return config, dist_info, logger, writer


def describe_failure(error):
    """(exit code, one-paragraph message) for a failure of one of the KNOWN_ERRORS types."""
    return exit_code_of(error), f'{title_of(error)}: {_message(error)}'


def run_tool(main_fn: Callable, argv: Sequence[str] | None = None) -> int:
    """Run a tool's main_fn(argv) with the scripts' handling of known failures: one paragraph on
    stderr and the same exit codes, no traceback."""
    try:
        return main_fn(argv)
    except KNOWN_ERRORS as e:
        code, message = describe_failure(e)
        print(message, file=sys.stderr)
        return code


def _message(error):
    """The error's own message; for one re-raised from a DataLoader worker, without the worker's
    traceback (its last line holds the original message)."""
    text = str(error)
    if 'Original Traceback' in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text


def run(
    main_fn: Callable,
    argv: Sequence[str] | None = None,
    task: Task = PRETRAIN,
    *,
    is_pretrain: bool | None = None,
) -> int:
    """Call main_fn(config, dist_info, logger, writer) for `task` (or the `is_pretrain` flag) and
    map failures to exit codes: 0 done, 1 failed, 2 configuration/usage error, 3 too many
    non-finite steps, 75 preempted (utils/errors.py)."""
    logger = None
    writer = None
    try:
        config, dist_info, logger, writer = setup(argv, as_task(task, is_pretrain))
        main_fn(config, dist_info, logger, writer)
        return 0
    except KNOWN_ERRORS as e:
        code, message = describe_failure(e)
        if logger is not None:
            (logger.warning if code == EXIT_PREEMPTED else logger.error)(message)
        if logger is None or os.environ.get('RANK', '0') != '0':
            print(message, file=sys.stderr)
        return code
    finally:
        if writer is not None:
            writer.close()
        release_output_folders()
        cleanup()
