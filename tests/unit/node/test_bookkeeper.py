"""Structured log lines, retention of the spool, and the status view."""

from __future__ import annotations

import json
import logging

import pytest

from spleen_seg.errors import NodeError
from spleen_seg.node.bookkeeper import SECONDS_PER_DAY, log_event, print_status, purge_expired
from spleen_seg.node.jobs import JobTable, NewInstance, ResultFile
from spleen_seg.node.spool import Spool

NOW = 1_700_000_000.0


def test_log_line_is_logfmt_with_quoted_values_and_no_empty_fields(caplog):
    with caplog.at_level(logging.INFO):
        log_event(logging.getLogger("t"), "job", job=3, state="done", error="", reason='a "b" c', series="1.2.3")
    assert caplog.records[0].message == 'event=job job=3 state=done reason="a \\"b\\" c" series=1.2.3'


def received_and_done(spool: Spool, table: JobTable, series: str, now: float, targets=()) -> int:
    path = spool.write_instance(series, f"{series}.1", b"x")
    table.record_instance(NewInstance(f"{series}.1", series, "", path, "", "", "PACS"), now)
    table.complete_quiet(now + 10, 5)
    job = table.claim_next(now + 10)
    spool.result_folder(job.id).mkdir()
    (spool.result_folder(job.id) / "spleen_seg.dcm").write_bytes(b"seg")
    result = ResultFile("seg", f"results/job-{job.id:06d}/spleen_seg.dcm", "1.2.840.10008.5.1.4.1.1.66.4", "9.1", "8.1")
    table.finish_processing(job.id, [result], targets, now + 10)
    return job.id


def test_retention_removes_files_of_old_finished_series_and_keeps_their_uids(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    table = JobTable(spool.db_path)
    try:
        old = received_and_done(spool, table, "1.1", NOW - 8 * SECONDS_PER_DAY)
        recent = received_and_done(spool, table, "1.2", NOW - 1 * SECONDS_PER_DAY)
        unsent = received_and_done(spool, table, "1.3", NOW - 9 * SECONDS_PER_DAY, targets=("PACS@h:1",))
        assert purge_expired(table, spool, keep_days=7, now=NOW) == ["1.1"]
        assert not spool.series_folder("1.1").exists() and not spool.result_folder(old).exists()
        assert spool.series_folder("1.2").exists() and spool.result_folder(recent).exists()
        assert spool.result_folder(unsent).exists()  # still sending: never purged
        assert table.has_instance("1.1.1")  # a resend stays a duplicate
        assert purge_expired(table, spool, keep_days=7, now=NOW) == []
        assert purge_expired(table, spool, keep_days=0, now=NOW) == ["1.2"]
    finally:
        table.close()


def test_status_lists_jobs_newest_first_with_sent_counts(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    table = JobTable(spool.db_path)
    received_and_done(spool, table, "1.1", NOW, targets=("PACS@h:1",))
    table.record_instance(NewInstance("2.1", "2.2", "", "p", "", "", "PACS"), NOW)
    table.complete_quiet(NOW + 10, 5)
    failing = table.claim_next(NOW + 10)
    table.fail(failing.id, "series 2.2: a single slice is not a 3D volume", NOW + 11)
    table.close()
    text = print_status(spool.root)
    lines = text.splitlines()
    assert lines[0] == f"spool {spool.root}: node not running; sending 1, failed 1"
    assert lines[1].split()[:3] == ["JOB", "STATE", "UPDATED"]
    assert lines[2].split()[:2] == ["2", "failed"] and lines[2].endswith("a single slice is not a 3D volume")
    assert lines[3].split()[:2] == ["1", "sending"] and " 0/1 " in lines[3]
    data = json.loads(print_status(spool.root, as_json=True, limit=1))
    assert [job["id"] for job in data["jobs"]] == [2] and data["node_pid"] is None


def test_status_of_a_folder_without_a_spool_is_a_one_line_error(tmp_path):
    with pytest.raises(NodeError, match="no node spool here"):
        print_status(tmp_path)


def test_status_escapes_terminal_codes_in_series_keys_and_errors(tmp_path, capsys):
    """A peer chooses the SeriesInstanceUID (the series key) and part of the error text; neither may
    reach the terminal raw (colour, cursor moves, a window title, a line rewritten by a carriage return)."""
    from spleen_seg.cli import main

    spool = Spool(tmp_path / "spool").create()
    table = JobTable(spool.db_path)
    series = "1.2.\x1b[2J\x1b[31mred"
    table.record_instance(NewInstance("1.1", series, "", "p", "", "", "PACS"), NOW)
    table.complete_quiet(NOW + 10, 5)
    job = table.claim_next(NOW + 10)
    table.fail(job.id, "cannot decode 1.1\r\x1b]0;owned\x07 \x9b1A \x7f", NOW + 11)
    table.close()
    assert main(["status", "--spool", str(spool.root)]) == 0
    out = capsys.readouterr().out
    assert not [c for c in out if (ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) <= 0x9f]
    row = out.splitlines()[2]
    assert '"1.2.\\u001b[2J\\u001b[31mred"' in row
    assert row.endswith('"cannot decode 1.1\\r\\u001b]0;owned\\u0007 \\u009b1A \\u007f"')
    plain = print_status(spool.root, as_json=True)  # JSON escapes by itself
    assert "\x1b" not in plain and json.loads(plain)["jobs"][0]["series_key"] == series
