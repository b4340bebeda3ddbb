"""Series completion by quiet period, on a fake clock."""

from __future__ import annotations

import logging

from spleen_seg.node.jobs import COMPLETE, JobTable, NewInstance
from spleen_seg.node.router import MAX_TICK_SECONDS, complete_quiet_series, tick_seconds


def test_tick_is_a_tenth_of_the_quiet_period_at_most_a_second():
    assert tick_seconds(2.0) == 0.2
    assert tick_seconds(600.0) == MAX_TICK_SECONDS


def test_series_completes_quiet_seconds_after_its_last_instance(tmp_path, caplog):
    table = JobTable(tmp_path / "jobs.sqlite")
    try:
        clock = 1000.0
        for k in range(5):  # one instance every 1.5 s: never quiet for 2 s
            table.record_instance(NewInstance(f"1.{k}", "1.2.3", "", f"s/{k}", "", "", "PACS"), clock)
            assert complete_quiet_series(table, clock + 1.4, quiet_seconds=2.0) == []
            clock += 1.5
        last = clock - 1.5
        assert complete_quiet_series(table, last + 1.99, quiet_seconds=2.0) == []
        with caplog.at_level(logging.INFO):
            (job,) = complete_quiet_series(table, last + 2.0, quiet_seconds=2.0)
        assert (job.state, job.instances) == (COMPLETE, 5)
        assert "event=job job=1 state=complete series=1.2.3 instances=5" in caplog.text
    finally:
        table.close()
