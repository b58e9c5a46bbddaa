"""Every error the framework reports in plain words, and the exit code each one ends a script with.

A leaf module: it imports nothing from the project, so any layer may raise these. The entry scripts
(engine/launch.py) print the message of any of them as one paragraph, without a traceback, and exit
with its `exit_code`:

    0  EXIT_OK          done
    1  EXIT_FAILURE     failed while running (e.g. a checkpoint could not be written)
    2  EXIT_CONFIG      wrong input: config, flags, data, checkpoint files, a busy output folder
                        (running the same command again would fail the same way)
    3  EXIT_NONFINITE   too many consecutive non-finite steps
    75 EXIT_PREEMPTED   stopped by a signal after writing a checkpoint (EX_TEMPFAIL: run it again)
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""

    exit_code = EXIT_CONFIG
    title = 'Configuration error'


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""

    exit_code = EXIT_CONFIG
    title = 'Checkpoint error'


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""

    exit_code = EXIT_FAILURE


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint that does not fit the model; the message names keys and shapes."""

    exit_code = EXIT_CONFIG
    title = 'Checkpoint error'


class DataError(RuntimeError):
    """The data on disk cannot be used as configured; the message names the path and the fix."""

    exit_code = EXIT_CONFIG
    title = 'Data error'


class BadImageError(DataError):
    """An image file that cannot be decoded (with DATA.ON_BAD_IMAGE error)."""


class ToolFailure(RuntimeError):
    """A tool ran but its result is wrong (e.g. an export that does not reproduce the model)."""

    exit_code = EXIT_FAILURE


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""

    exit_code = EXIT_NONFINITE


class Preempted(Exception):
    """Raised after the stop checkpoint is written; carries EXIT_PREEMPTED."""

    exit_code = EXIT_PREEMPTED
    title = 'Preempted'


# Failures whose message is enough: the entry scripts show it without a traceback.
KNOWN_ERRORS = (
    ConfigError,
    CheckpointError,
    CheckpointWriteError,
    IncompatibleCheckpointError,
    DataError,
    ToolFailure,
    NonFiniteLossError,
    Preempted,
    FileNotFoundError,
    NotADirectoryError,
)


def exit_code_of(error):
    """The exit code a script ends with for `error`: its own, EXIT_CONFIG for a missing path,
    else EXIT_FAILURE."""
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return EXIT_CONFIG
    return getattr(error, 'exit_code', EXIT_FAILURE)


def title_of(error):
    """The word the one-paragraph message starts with."""
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return 'Configuration error'
    return getattr(error, 'title', 'Error')


def require(condition, message, error=None):
    """Raise `error`(message) (default ConfigError) unless `condition` holds: the one-line form of
    every config check."""
    if not condition:
        raise (error or ConfigError)(message)
