"""Peak Python allocations of one call, measured with tracemalloc (it sees every thread's, the bytes
zlib inflates and numpy's arrays): the bomb tests' yardstick."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any


def traced_peak(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result (or the exception it raised, returned for the test to assert on) and the peak
    bytes traced while it ran."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except Exception as err:
            result = err
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
