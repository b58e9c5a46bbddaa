"""Logging as in the official code: coloured console on rank 0, a plain file per rank."""

import functools
import logging
import os
import sys

from termcolor import colored

_FILE_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_DATE_FORMAT = '%Y-%m-%d %H:%M:%S'


@functools.lru_cache
def create_logger(output_dir, dist_rank=0, name=''):
    """Logger `name` writing to stdout (rank 0 only) and to OUTPUT/log_rank{rank}.txt (append)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.handlers.clear()

    if dist_rank == 0:
        console_format = (
            colored('[%(asctime)s %(name)s]', 'green')
            + colored('(%(filename)s %(lineno)d)', 'yellow')
            + ': %(levelname)s %(message)s'
        )
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)  # DEBUG details (model, parameter lists) go to the file
        console.setFormatter(logging.Formatter(console_format, datefmt=_DATE_FORMAT))
        logger.addHandler(console)

    file_handler = logging.FileHandler(
        os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a'
    )
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT, datefmt=_DATE_FORMAT))
    logger.addHandler(file_handler)

    # Messages of library modules (data warnings about skipped files, ...) go to the same places.
    library = logging.getLogger('simmim')
    library.setLevel(logging.INFO)
    library.propagate = False
    library.handlers[:] = logger.handlers
    return logger
