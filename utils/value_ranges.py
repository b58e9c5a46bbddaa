"""Allowed ranges of numeric config values, and the one message a value outside its range gets:
the key, the value and the range.

    Range(low, high, low_open=False, high_open=False, none_ok=False, note='')   an interval
    require_in_range(key, value, allowed)   ConfigError unless `value` lies in `allowed`

A value must be a finite number (a YAML ``.nan`` or ``.inf`` never is); a list or tuple value has
each element checked. A leaf module (imports only utils.errors), so config.py keeps its table
(config.NUMERIC_RANGES) beside the defaults.
"""

import math
from typing import NamedTuple

from utils.errors import ConfigError


class Range(NamedTuple):
    """[low, high] (or open at either end); None: unbounded on that side. `none_ok`: None is
    accepted too (e.g. "off"); `note` says what the key means, for the error message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none_ok: bool = False
    note: str = ''

    def contains(self, value):
        """Whether `value` (a number, or None) lies in the range."""
        if value is None:
            return self.none_ok
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self):
        """The range in words, e.g. 'lie in (0, 1)', 'be >= 0', 'be positive'."""
        if self.low is not None and self.high is not None:
            text = (
                f'lie in {"(" if self.low_open else "["}{self.low:g}, '
                f'{self.high:g}{")" if self.high_open else "]"}'
            )
        elif self.low is not None:
            text = (
                'be positive'
                if self.low == 0 and self.low_open
                else (f'be {">" if self.low_open else ">="} {self.low:g}')
            )
        elif self.high is not None:
            text = f'be {"<" if self.high_open else "<="} {self.high:g}'
        else:
            text = 'be a finite number'
        return text + (' (or None)' if self.none_ok else '')


def require_in_range(key, value, allowed):
    """Raise ConfigError naming `key`, `value` and the range unless `value` (each element of a
    list or tuple) lies in `allowed`, a Range."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if not allowed.contains(v)]
    if not bad:
        return
    each = 'Each value of ' if isinstance(value, (list, tuple)) else ''
    shown = f'{list(value)!r} ({bad[0]!r} is not)' if each else repr(value)
    if isinstance(bad[0], float) and not math.isfinite(bad[0]):
        shown += ' (YAML .nan / .inf, or an overflow, are not numbers a run can use)'
    note = f' {allowed.note}' if allowed.note else ''
    raise ConfigError(
        f'{each}{key} must {allowed.describe()}, got {shown}.{note} Set {key} to a value in that '
        f'range in the YAML or with --opts {key} VALUE.'
    )
