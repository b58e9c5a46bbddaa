"""Reading the small JSON files next to checkpoints and data (checksum records, the sharded
checkpoint's marker, a shard set's _info.json), with the one message a damaged one gets."""

import json


def read_json(path, error, fix):
    """The JSON value in the file `path`; an unreadable or malformed file raises `error` (an
    exception class) naming the file, the cause and `fix`, what to do about it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(f'{path} cannot be read as JSON ({e}). {fix}') from None
