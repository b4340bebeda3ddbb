"""One progress bar for a whole batch (cases per second, time left, failures so far) and its closing totals.

The local batch and the Ray batch share it, so both report the same way.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spleen_seg.batch.case import CaseResult

logger = logging.getLogger(__name__)


class BatchProgress:
    """A tqdm bar over the cases to compute (skipped cases are not in it: they would inflate the rate)."""

    def __init__(self, total: int, enabled: bool = True, label: str = "cases") -> None:
        from tqdm import tqdm

        self.failed = 0
        self.current = ""
        self.bar = tqdm(total=total, desc=label, unit="case", disable=not enabled, smoothing=0.1)

    def running(self, case: str) -> None:
        self.current = case
        self.bar.set_postfix_str(self._postfix(), refresh=False)

    def done(self, result: CaseResult) -> None:
        self.failed += result.status == "failed"
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update()

    def _postfix(self) -> str:
        return ", ".join(part for part in (f"{self.failed} failed" if self.failed else "", self.current) if part)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def totals_line(results: list[CaseResult], seconds: float) -> str:
    """``"8 cases in 12.1 s: 6 finished (5 ok, 1 spleen not found), 1 failed, 1 skipped (done before); 0.58 cases/s"``.

    The rate counts the cases computed in this run (finished or failed) over ``seconds``.
    """
    skipped = sum(r.reused for r in results)
    status = Counter(r.status for r in results if not r.reused)
    finished = status["ok"] + status["not_found"]
    computed = finished + status["failed"]
    rate = computed / seconds if seconds > 0 else 0.0
    line = (f"{len(results)} cases in {seconds:.1f} s: {finished} finished ({status['ok']} ok, "
            f"{status['not_found']} spleen not found), {status['failed']} failed, {skipped} skipped (done before)")
    if status["interrupted"]:
        line += f", {status['interrupted']} interrupted"
    return f"{line}; {rate:.2f} cases/s"


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
