"""The job table's state machine, driven by a fake clock: receiving, completion, late instances,
duplicates, processing, sending, recovery after a kill, and persistence across reopening."""

from __future__ import annotations

import pytest

from spleen_seg.node.jobs import (
    COMPLETE,
    DONE,
    FAILED,
    PENDING,
    RECEIVING,
    SEGMENTING,
    SENDING,
    SENT,
    JobTable,
    NewInstance,
    ResultFile,
)

QUIET = 10.0
TARGETS = ("PACS@127.0.0.1:104", "http://pacs/dicom-web")


@pytest.fixture
def table(tmp_path):
    table = JobTable(tmp_path / "jobs.sqlite")
    yield table
    table.close()


def instance(uid: str, series: str = "1.2.3") -> NewInstance:
    return NewInstance(sop_instance_uid=uid, series_key=series, study_uid="1.2", path=f"series/{series}/{uid}.dcm",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                       calling_ae="PACS")


def seg(job: int) -> ResultFile:
    return ResultFile(kind="seg", path=f"results/job-{job:06d}/spleen_seg.dcm", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                      sop_instance_uid=f"9.{job}", series_uid=f"8.{job}")


def receive(table: JobTable, uids, now: float, series: str = "1.2.3"):
    return [table.record_instance(instance(uid, series), now) for uid in uids]


def test_instances_of_a_series_join_one_receiving_job(table):
    jobs = receive(table, ["1.1", "1.2", "1.3"], now=100.0)
    assert {job.id for job in jobs} == {1}
    job = table.job(1)
    assert (job.state, job.instances, job.last_instance_at, job.attempts) == (RECEIVING, 3, 100.0, 0)
    assert table.series_paths("1.2.3") == [f"series/1.2.3/{uid}.dcm" for uid in ("1.1", "1.2", "1.3")]


def test_duplicate_instance_is_not_recorded_but_delays_completion(table):
    receive(table, ["1.1"], now=100.0)
    assert table.record_instance(instance("1.1"), 105.0) is None
    assert table.job(1).instances == 1
    assert table.complete_quiet(now=112.0, quiet_seconds=QUIET) == []  # quiet since 105 only
    assert [job.id for job in table.complete_quiet(now=115.0, quiet_seconds=QUIET)] == [1]


def test_series_completes_only_after_the_quiet_period(table):
    receive(table, ["1.1"], now=100.0)
    receive(table, ["1.2"], now=104.0)
    assert table.complete_quiet(now=113.9, quiet_seconds=QUIET) == []
    (job,) = table.complete_quiet(now=114.0, quiet_seconds=QUIET)
    assert (job.state, job.completed_at) == (COMPLETE, 114.0)
    assert table.complete_quiet(now=200.0, quiet_seconds=QUIET) == []  # once only


def test_instance_arriving_before_processing_starts_rejoins_the_job(table):
    receive(table, ["1.1"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    (job,) = receive(table, ["1.2"], now=111.0)
    assert (job.id, job.state, job.instances, job.completed_at) == (1, RECEIVING, 2, None)
    assert table.claim_next(now=112.0) is None


def test_late_instance_after_processing_started_opens_a_new_job(table):
    receive(table, ["1.1", "1.2"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    assert table.claim_next(now=111.0).state == SEGMENTING
    (late,) = receive(table, ["1.3"], now=112.0)
    assert (late.id, late.state, late.instances) == (2, RECEIVING, 1)
    # The new job processes the whole series, old instances included.
    assert len(table.series_paths("1.2.3")) == 3


def test_resent_series_after_processing_yields_no_new_job(table):
    receive(table, ["1.1", "1.2"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    job = table.claim_next(now=111.0)
    table.finish_processing(job.id, [seg(job.id)], TARGETS, now=112.0)
    assert receive(table, ["1.1", "1.2"], now=200.0) == [None, None]
    assert [j.id for j in table.jobs()] == [1]


def test_jobs_are_taken_in_completion_order(table):
    receive(table, ["2.1"], now=100.0, series="2")
    receive(table, ["1.1"], now=95.0, series="1")
    table.complete_quiet(now=106.0, quiet_seconds=QUIET)  # series 1 only (quiet since 95)
    table.complete_quiet(now=111.0, quiet_seconds=QUIET)  # then series 2
    assert [table.claim_next(now=112.0).series_key, table.claim_next(now=112.0).series_key] == ["1", "2"]
    assert table.claim_next(now=112.0) is None


def test_results_are_queued_per_target_and_the_job_is_done_when_all_are_sent(table):
    receive(table, ["1.1"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    job = table.claim_next(now=111.0)
    sending = table.finish_processing(job.id, [seg(job.id)], TARGETS, now=112.0)
    assert sending.state == SENDING
    due = table.due_results(now=112.0)
    assert sorted(r.target for r in due) == sorted(TARGETS) and {r.state for r in due} == {PENDING}
    table.mark_retry(due[0].id, "no connection", retry_at=116.0, now=112.0)
    assert [r.id for r in table.due_results(now=115.9)] == [due[1].id]
    assert table.mark_sent(due[1].id, now=113.0) is None  # one target still pending
    assert table.job(job.id).last_error == "sending: no connection"
    done = table.mark_sent(due[0].id, now=117.0)
    assert done is not None and done.state == DONE
    assert [(r.state, r.attempts) for r in table.results(job.id)] == [(SENT, 2), (SENT, 1)]


def test_job_without_targets_is_done_after_processing(table):
    receive(table, ["1.1"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    job = table.claim_next(now=111.0)
    assert table.finish_processing(job.id, [seg(job.id)], (), now=112.0).state == DONE
    assert table.results() == []


def test_failed_job_keeps_its_reason(table):
    receive(table, ["1.1"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    job = table.claim_next(now=111.0)
    table.fail(job.id, "series 1.2.3: a single slice is not a 3D volume", now=112.0)
    failed = table.job(job.id)
    assert (failed.state, failed.last_error, failed.attempts) == (FAILED, "series 1.2.3: a single slice is not a 3D volume", 1)


def test_recovery_requeues_interrupted_jobs_and_gives_up_after_max_attempts(table):
    for series, now in (("1", 100.0), ("2", 101.0)):
        receive(table, [f"{series}.1"], now=now, series=series)
    table.complete_quiet(now=120.0, quiet_seconds=QUIET)
    first, second = table.claim_next(now=121.0), table.claim_next(now=121.0)
    # The node dies; series 1 had already been interrupted twice before this attempt.
    requeued, failed = table.recover(now=130.0, max_attempts=2)
    assert [j.id for j in requeued] == [first.id, second.id] and failed == []
    table.claim_next(now=131.0)  # first again: attempt 2
    requeued, failed = table.recover(now=140.0, max_attempts=2)
    assert [j.id for j in failed] == [first.id]
    assert "interrupted 2 times" in table.job(first.id).last_error
    assert table.job(second.id).state == COMPLETE


def test_recovery_makes_unsent_results_due_at_once(table):
    receive(table, ["1.1"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    job = table.claim_next(now=111.0)
    table.finish_processing(job.id, [seg(job.id)], TARGETS[:1], now=112.0)
    (result,) = table.due_results(now=112.0)
    table.mark_retry(result.id, "no connection", retry_at=400.0, now=113.0)
    assert table.due_results(now=120.0) == []
    table.recover(now=120.0, max_attempts=3)
    assert [r.id for r in table.due_results(now=120.0)] == [result.id]


def test_table_reopened_after_close_has_every_committed_change(tmp_path):
    table = JobTable(tmp_path / "jobs.sqlite")
    receive(table, ["1.1", "1.2"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    table.close()
    reopened = JobTable(tmp_path / "jobs.sqlite")
    try:
        job = reopened.job(1)
        assert (job.state, job.instances) == (COMPLETE, 2)
        assert reopened.has_instance("1.2") and not reopened.has_instance("1.3")
    finally:
        reopened.close()


def test_expired_series_and_purge_keep_uids(table):
    receive(table, ["1.1"], now=100.0)
    receive(table, ["2.1"], now=100.0, series="2")
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    job = table.claim_next(now=111.0)
    table.finish_processing(job.id, [seg(job.id)], (), now=112.0)
    assert table.expired_series(cutoff=112.0) == []
    assert table.expired_series(cutoff=113.0) == ["1.2.3"]  # series 2 is still complete, not finished
    retired = []
    assert table.purge_if_expired("2", 1000.0, retired.append) is None  # not finished: nothing retired
    assert table.purge_if_expired("1.2.3", 113.0, lambda key: retired.append(key)) == ([job.id], None)
    assert retired == ["1.2.3"]
    assert table.series_paths("1.2.3") == [] and table.has_instance("1.1")
    assert table.expired_series(cutoff=1000.0) == []
    assert table.purge_if_expired("1.2.3", 1000.0, retired.append) is None  # purged once


def test_resending_a_failed_series_retries_it_with_the_new_files(table):
    receive(table, ["1.1", "1.2"], now=100.0)
    table.complete_quiet(now=110.0, quiet_seconds=QUIET)
    job = table.claim_next(now=111.0)
    table.fail(job.id, "cannot decode the pixels of 1.2", now=112.0)
    assert not table.is_duplicate("1.2")
    retried = [table.record_instance(instance(uid), 200.0) for uid in ("1.1", "1.2")]
    assert [j.id for j in retried] == [2, 2] and retried[-1].instances == 2
    assert table.is_duplicate("1.2")  # now part of the retry, which has not failed
    assert len(table.series_paths("1.2.3")) == 2  # one row per instance, not two
    assert table.job(job.id).state == FAILED  # the failed attempt stays in the history
