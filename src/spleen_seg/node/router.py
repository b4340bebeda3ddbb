"""Series completion: a series is complete when none of its instances arrived for a quiet period.

DICOM has no "end of series" message: a PACS sends a series over one or several
associations, possibly interleaved with others, so the node (like mercure's router and
Orthanc's "stable series") waits until the series has been quiet for ``quiet_seconds``.
"""

from __future__ import annotations

import logging

from spleen_seg.node.bookkeeper import log_job
from spleen_seg.node.jobs import Job, JobTable

logger = logging.getLogger(__name__)
# The router looks this often (at most) for quiet series: a small fraction of the quiet
# period, so completion is late by no more than that.
MAX_TICK_SECONDS = 1.0
TICKS_PER_QUIET_PERIOD = 10


def tick_seconds(quiet_seconds: float) -> float:
    """How long the router sleeps between looks."""
    return min(MAX_TICK_SECONDS, quiet_seconds / TICKS_PER_QUIET_PERIOD)


def complete_quiet_series(table: JobTable, now: float, quiet_seconds: float) -> list[Job]:
    """Mark complete (and log) every series with no instance for ``quiet_seconds`` before ``now``."""
    completed = table.complete_quiet(now, quiet_seconds)
    for job in completed:
        log_job(logger, job, quiet_seconds=quiet_seconds)
    return completed
