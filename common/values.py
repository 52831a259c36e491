"""Type checks of plain Python values given through the API (the command line's click types check its own)."""

from __future__ import annotations

import math
from typing import Any


def is_integer(value: Any) -> bool:
    """An int, not a bool (True is an int to Python, not a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
