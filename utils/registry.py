"""Tables of named units (MODEL.TYPE, DATA.MASK_STRATEGY, MODEL.SIMMIM.HEAD.NAME, ...) and the one
message a wrong name gets: the config key, the valid names and the closest ones.

    Registry(key, what, entries)   a dict of name -> unit; .register(name, unit), .lookup(name)
    require_choice(key, value, choices, what='values')   the same check for a plain tuple of values

A leaf module (imports only utils.errors), so every layer may keep its table here.
"""

import difflib

from utils.errors import ConfigError


def not_one_of(key, value, choices, what='values'):
    """The ConfigError for `value` of `key` outside `choices`, with the closest valid ones."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=2, cutoff=0.5)
    hint = f' Did you mean {" or ".join(repr(c) for c in close)}?' if close else ''
    return ConfigError(f"{key} '{value}' is not one of the valid {what}: {', '.join(names)}.{hint}")


def require_choice(key, value, choices, what='values'):
    """Raise `not_one_of` unless `value` is in `choices`."""
    if value not in choices:
        raise not_one_of(key, value, choices, what)


class Registry(dict):
    """Name -> unit, in registration order: a dict with `register` (no name twice) and `lookup`
    (a ConfigError naming `key`, the valid names and the closest ones, instead of a KeyError)."""

    def __init__(self, key, what='names', entries=()):
        super().__init__(entries)
        self.key = key
        self.what = what

    def register(self, name, unit):
        """Add `unit` under `name`; return it."""
        if name in self:
            raise ValueError(f"{self.key} '{name}' is registered twice.")
        self[name] = unit
        return unit

    def lookup(self, name):
        """The unit registered as `name`, or the ConfigError that names the valid ones."""
        if name not in self:
            raise not_one_of(self.key, name, self, self.what)
        return self[name]
