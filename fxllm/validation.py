"""Checks of user-given scalars, shared by every argument: type, range, finiteness.

Each raises with the argument's name, what it got and what is allowed: a bool given as a
string, an int given as a float, NaN or an infinity where a number is expected."""

from __future__ import annotations

import math
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {_bounds(minimum, maximum)}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """A finite int or float within the bounds (the minimum excluded where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if below or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {_bounds(minimum, maximum, exclusive_minimum)}, got {value!r}")
    return value


def check_optional(check, name: str, value: Any, **bounds: Any) -> Any:
    """``check`` unless ``value`` is None."""
    return None if value is None else check(name, value, **bounds)


def _bounds(minimum: float | None, maximum: float | None, exclusive_minimum: bool = False) -> str:
    """">= 1", "<= 2", "in [0, 1]" or "in (0, 1]"."""
    low, high = _number(minimum), _number(maximum)
    if maximum is None:
        return f"{'>' if exclusive_minimum else '>='} {low}"
    if minimum is None:
        return f"<= {high}"
    return f"in {'(' if exclusive_minimum else '['}{low}, {high}]"


def _number(value: float | None) -> str:
    """2.0 as "2", 0.5 as "0.5"."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
