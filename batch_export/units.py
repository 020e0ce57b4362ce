"""Parsing of durations and other unit-bearing values shared by the manifest and the command line."""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration"]

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | int | float) -> float:
    """Return a duration in seconds.

    Accepts a number of seconds (``2``, ``0.5``, ``"2"``) or unit forms ``500ms``, ``90s``, ``1.5s``,
    ``15m``, ``2h``, ``1h30m`` (units in decreasing order, each at most once).

    Raises:
        ValueError: the value is negative, not finite, a bool, or not in one of those forms.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m or 1h30m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else _parse_units(text)
        except ValueError:
            raise ValueError(
                "expected a duration such as 90s, 15m, 1h30m, 500ms or a number of seconds"
            ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be a finite number of seconds, 0 or more")
    return seconds


def _parse_units(text: str) -> float:
    pos, total, last_rank = 0, 0.0, -1
    order = ["h", "m", "s", "ms"]
    if not text:
        raise ValueError(text)
    for match in _PART.finditer(text):
        if match.start() != pos:
            raise ValueError(text)
        rank = order.index(match.group(2))
        if rank <= last_rank:
            raise ValueError(text)
        last_rank = rank
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(text)
    return total
