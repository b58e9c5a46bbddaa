"""Error handling of the command-line tools (tools/): a known failure prints one paragraph that
names the problem and the fix, and returns the entry scripts' exit code; no traceback."""
import os
import sys

from config import ConfigError
from utils.checkpoint import CheckpointWriteError
from utils.launch import EXIT_CONFIG, EXIT_FAILURE
from utils.pretrained import IncompatibleCheckpointError
from utils.safe_load import CheckpointError
from utils.timm_interop import UnsupportedInTimm

# Bad input: a missing, unreadable or foreign file, a model the target cannot hold, an unusable
# config or output path.
USAGE_ERRORS = (ConfigError, CheckpointError, IncompatibleCheckpointError, UnsupportedInTimm,
                CheckpointWriteError)


def make_folder_for(path):
    """Create the folder that will hold the file `path`, or raise a ConfigError naming it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot write to {folder}: {e.strerror or e}. Pick a folder you can "
                          f"write to.") from None


class ToolFailure(RuntimeError):
    """The tool ran but its result is wrong (e.g. an export that does not reproduce the model)."""


def run_tool(main, argv=None):
    """main(argv) -> exit code, with known failures reported as one paragraph on stderr."""
    try:
        return main(argv)
    except USAGE_ERRORS as e:
        print(f'Error: {e}', file=sys.stderr)
        return EXIT_CONFIG
    except ToolFailure as e:
        print(f'Error: {e}', file=sys.stderr)
        return EXIT_FAILURE
