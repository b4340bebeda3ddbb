"""Sending results: backoff schedule, retries across a fake clock, one association per target,
jobs done when every target confirmed, unreadable results, and real C-STORE to an in-process SCP."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage
from synthetic_dicom import random_volume, write_series

from spleen_seg.node.dispatcher import BACKOFF_MAX_SECONDS, backoff_seconds, cstore, send_due
from spleen_seg.node.jobs import DONE, FAILED, SENDING, JobTable, NewInstance, ResultFile
from spleen_seg.node.settings import NodeSettings
from spleen_seg.node.spool import Spool

TARGET = "PACS@127.0.0.1:104"
OTHER = "ARCHIVE@127.0.0.1:105"


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeSender:
    """Records calls; fails while ``down`` holds the target."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []
        self.down: set[str] = set()

    def __call__(self, target, datasets):
        self.calls.append((target, [str(ds.SOPInstanceUID) for ds in datasets]))
        return ["no connection" if target in self.down else None for _ in datasets]


def queue_job(spool: Spool, table: JobTable, targets, now: float, kinds=("seg",)) -> int:
    """A job that finished processing with one small DICOM file per kind."""
    uid = f"1.2.{len(table.jobs()) + 1}"
    table.record_instance(NewInstance(uid, uid, "1.2", f"series/{uid}/a.dcm", "1.2.840.10008.5.1.4.1.1.2", "", "PACS"), now)
    table.complete_quiet(now + 20, 10)
    job = table.claim_next(now + 20)
    folder = spool.result_folder(job.id)
    files = []
    for kind in kinds:
        ds = pydicom.dcmread(write_series(folder / kind, random_volume(shape=(4, 4, 1)))[0])
        files.append(ResultFile(kind, spool.relative(folder / kind / "slice_000.dcm"), str(ds.SOPClassUID),
                                str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
    table.finish_processing(job.id, files, tuple(targets), now + 20)
    return job.id


def settings(spool: Spool) -> NodeSettings:
    return NodeSettings(spool=spool.root)


def test_backoff_doubles_from_two_seconds_and_is_capped():
    assert [backoff_seconds(n) for n in range(1, 6)] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert backoff_seconds(30) == BACKOFF_MAX_SECONDS


def test_failed_send_is_retried_with_backoff_until_the_target_is_back(spool_and_table):
    spool, table = spool_and_table
    clock, sender = FakeClock(), FakeSender()
    job = queue_job(spool, table, [TARGET], clock.now - 20)
    sender.down.add(TARGET)
    assert send_due(table, spool, settings(spool), clock, sender) == []
    (result,) = table.results(job)
    assert (result.attempts, result.next_attempt_at, result.last_error) == (1, clock.now + 2.0, "no connection")
    clock.now += 1.9
    send_due(table, spool, settings(spool), clock, sender)
    assert len(sender.calls) == 1  # not due yet
    clock.now += 0.1
    send_due(table, spool, settings(spool), clock, sender)
    assert len(sender.calls) == 2 and table.results(job)[0].next_attempt_at == clock.now + 4.0
    sender.down.clear()
    clock.now += 4.0
    (done,) = send_due(table, spool, settings(spool), clock, sender)
    assert done.id == job and done.state == DONE
    assert table.results(job)[0].attempts == 3
    clock.now += 1000
    send_due(table, spool, settings(spool), clock, sender)
    assert len(sender.calls) == 3  # nothing is sent twice


def test_each_target_gets_one_association_with_all_due_files(spool_and_table):
    spool, table = spool_and_table
    clock, sender = FakeClock(), FakeSender()
    job = queue_job(spool, table, [TARGET, OTHER], clock.now - 20, kinds=("seg", "sr", "sc"))
    sender.down.add(OTHER)
    assert send_due(table, spool, settings(spool), clock, sender) == []
    assert sorted((target, len(uids)) for target, uids in sender.calls) == [(OTHER, 3), (TARGET, 3)]
    assert table.job(job).state == SENDING  # OTHER still owes three results
    sender.down.clear()
    clock.now += 2.0
    (done,) = send_due(table, spool, settings(spool), clock, sender)
    assert done.id == job and sender.calls[-1][0] == OTHER


def test_missing_result_file_fails_its_job(spool_and_table):
    spool, table = spool_and_table
    clock, sender = FakeClock(), FakeSender()
    job = queue_job(spool, table, [TARGET], clock.now - 20)
    (spool.root / table.results(job)[0].path).unlink()
    send_due(table, spool, settings(spool), clock, sender)
    assert table.job(job).state == FAILED and "unreadable" in table.job(job).last_error
    assert sender.calls == [] and table.results(job) == []


@pytest.fixture
def storage_scp():
    """An in-process C-STORE SCP for SEG that keeps what it receives."""
    received: list[pydicom.Dataset] = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(SegmentationStorage, ExplicitVRLittleEndian)
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield f"PACS@127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


def test_cstore_delivers_and_reports_per_file(storage_scp, tmp_path):
    target, received = storage_scp
    datasets = [pydicom.dcmread(p) for p in write_series(tmp_path / "ct", random_volume(shape=(4, 4, 2)))]
    assert cstore(target, "SPLEENSEG", datasets) == [None, None]
    assert [ds.SOPInstanceUID for ds in received] == [ds.SOPInstanceUID for ds in datasets]


def test_cstore_to_a_closed_port_reports_no_connection(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    datasets = [pydicom.dcmread(p) for p in write_series(tmp_path / "ct", random_volume(shape=(4, 4, 1)))]
    (error,) = cstore(f"PACS@127.0.0.1:{port}", "SPLEENSEG", datasets)
    assert error is not None and "no connection" in error


def test_cstore_refused_sop_class_is_an_error_per_file(storage_scp, tmp_path):
    target, received = storage_scp
    mr = [pydicom.dcmread(p) for p in write_series(tmp_path / "mr", random_volume(shape=(4, 4, 1)), modality="MR")]
    (error,) = cstore(target, "SPLEENSEG", mr)
    assert error is not None and received == []



def test_sender_that_raises_schedules_a_retry(spool_and_table):
    spool, table = spool_and_table
    clock = FakeClock()
    job = queue_job(spool, table, [TARGET], clock.now - 20)

    def broken(target, datasets):
        raise AttributeError("'NoneType' object has no attribute 'Status'")

    send_due(table, spool, settings(spool), clock, broken)
    (result,) = table.results(job)
    assert result.attempts == 1 and result.next_attempt_at == clock.now + 2.0
    assert result.last_error == "sending failed: AttributeError: 'NoneType' object has no attribute 'Status'"
