"""The Storage SCP in-process on 127.0.0.1 (no model): C-ECHO, durable C-STORE, duplicates,
calling/called AE filtering, non-CT SOP classes, association limit, TLS, port in use, disk full,
undecodable datasets, anonymised instances without UIDs; allowed hosts, the dataset limit, the
spool quota, and retention racing the receiver (each interleaving forced)."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import ssl
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from node_harness import make_tls_files, tls_echo
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from synthetic_dicom import random_volume, write_series

from spleen_seg.errors import NodeError
from spleen_seg.node import receiver as receiver_module
from spleen_seg.node.bookkeeper import SECONDS_PER_DAY, purge_expired
from spleen_seg.node.jobs import RECEIVING, JobTable
from spleen_seg.node.receiver import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, Receiver
from spleen_seg.node.settings import NodeSettings, TlsFiles
from spleen_seg.node.spool import Spool

NODE_AE = "SPLEENSEG"
TIMEOUT_S = 10


def start(tmp_path: Path, **overrides) -> tuple[Receiver, JobTable, Spool]:
    spool = Spool(tmp_path / "spool").create()
    table = JobTable(spool.db_path)
    settings = NodeSettings(spool=spool.root, host="127.0.0.1", port=0, **overrides)
    receiver = Receiver(settings, spool, table)
    receiver.start()
    return receiver, table, spool


@pytest.fixture
def node(tmp_path):
    receiver, table, spool = start(tmp_path, allowed_callers=("PACS",))
    yield receiver, table, spool
    receiver.stop()
    table.close()


def associate(port: int, calling: str = "PACS", called: str = NODE_AE, contexts=(CTImageStorage,), tls=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    for sop_class in contexts:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)


def wait_for(condition, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def ct_series(folder: Path, n: int = 3, **kwargs) -> list[pydicom.Dataset]:
    paths = write_series(folder, random_volume(shape=(6, 5, n)), **kwargs)
    return [pydicom.dcmread(p) for p in paths]


def store_all(port: int, datasets, calling: str = "PACS") -> list[int]:
    assoc = associate(port, calling)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_echo(node):
    receiver, _, _ = node
    assoc = associate(receiver.port, contexts=(Verification,))
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


def test_stored_instances_are_spooled_as_received_and_recorded(node, tmp_path):
    receiver, table, spool = node
    datasets = ct_series(tmp_path / "in", series_uid="1.2.826.0.1.3680043.2.1")
    assert store_all(receiver.port, datasets) == [0, 0, 0]
    (job,) = table.jobs()
    assert (job.state, job.instances, job.series_key, job.calling_ae) == (RECEIVING, 3, "1.2.826.0.1.3680043.2.1", "PACS")
    paths = table.series_paths(job.series_key)
    assert len(paths) == 3
    for path, ds in zip(sorted(paths), sorted(datasets, key=lambda d: d.SOPInstanceUID + ".dcm"), strict=True):
        stored = pydicom.dcmread(spool.root / path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_resent_instances_are_acknowledged_once_stored(node, tmp_path):
    receiver, table, spool = node
    datasets = ct_series(tmp_path / "in")
    store_all(receiver.port, datasets)
    assert store_all(receiver.port, datasets) == [0, 0, 0]
    assert table.jobs()[0].instances == 3
    assert len(list(spool.series_root.rglob("*.dcm"))) == 3


def test_instances_without_series_uid_are_grouped_by_a_derived_one(node, tmp_path):
    receiver, table, _ = node
    datasets = ct_series(tmp_path / "in")
    for ds in datasets:
        ds.SeriesInstanceUID = ""
        ds.StudyInstanceUID = ""
    assert store_all(receiver.port, datasets) == [0, 0, 0]
    (job,) = table.jobs()
    assert job.instances == 3 and pydicom.uid.UID(job.series_key).is_valid


def test_rejected_calling_ae_stores_nothing_and_is_logged(node, tmp_path, caplog):
    receiver, table, _ = node
    with caplog.at_level(logging.INFO, logger="spleen_seg.node"):
        assoc = associate(receiver.port, calling="INTRUDER")
    assert assoc.is_rejected
    assert table.jobs() == []
    assert any("event=association result=rejected calling_ae=INTRUDER" in r.message
               and "calling AE title not allowed" in r.message for r in caplog.records)


def test_wrong_called_ae_is_rejected(node):
    receiver, _, _ = node
    assert associate(receiver.port, called="OTHERNODE").is_rejected


def test_non_ct_sop_class_is_refused_at_negotiation(node, tmp_path, caplog):
    receiver, table, _ = node
    mr = ct_series(tmp_path / "mr", n=2, modality="MR")
    with caplog.at_level(logging.INFO, logger="spleen_seg.node"):
        # With no accepted context the SCU gives up on the association, as storescu does.
        assoc = associate(receiver.port, contexts=(MRImageStorage,))
        assert not assoc.is_established
        wait_for(lambda: any("refused_sop_classes=\"MR Image Storage\"" in r.message for r in caplog.records))
    assert table.jobs() == [] and mr[0].Modality == "MR"


def test_associations_beyond_the_limit_are_rejected(tmp_path):
    receiver, table, _ = start(tmp_path, max_associations=1)
    try:
        first = associate(receiver.port)
        assert first.is_established
        second = associate(receiver.port)
        assert second.is_rejected
        first.release()
        wait_for(lambda: not receiver._server.active_associations)
        third = associate(receiver.port)
        assert third.is_established
        third.release()
    finally:
        receiver.stop()
        table.close()


def test_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spool = Spool(tmp_path / "spool").create()
        table = JobTable(spool.db_path)
        receiver = Receiver(NodeSettings(spool=spool.root, host="127.0.0.1", port=port), spool, table)
        with pytest.raises(NodeError, match=f"port 127.0.0.1:{port} is already in use.*pass another --port"):
            receiver.start()
        table.close()


def test_nearly_full_disk_answers_out_of_resources(node, tmp_path, monkeypatch):
    receiver, table, spool = node
    monkeypatch.setattr(receiver_module, "MIN_FREE_BYTES", shutil.disk_usage(spool.root).free * 10)
    assert store_all(receiver.port, ct_series(tmp_path / "in", n=1)) == [STATUS_OUT_OF_RESOURCES]
    assert table.jobs() == [] and list(spool.series_root.iterdir()) == []


class _UndecodableEvent:
    """What pynetdicom hands the handler for a dataset pydicom cannot parse."""

    class request:  # noqa: N801 - mimics pynetdicom's attribute names
        AffectedSOPInstanceUID = "1.2.3.4"
        AffectedSOPClassUID = CTImageStorage

    class assoc:  # noqa: N801
        class requestor:  # noqa: N801
            ae_title = "PACS"

    @property
    def dataset(self):
        raise EOFError("unexpected end of file while reading an element")


def test_undecodable_dataset_is_refused_with_cannot_understand(node):
    receiver, table, _ = node
    status, _, _ = receiver._store(_UndecodableEvent())
    assert status == STATUS_CANNOT_UNDERSTAND
    assert table.jobs() == []


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> TlsFiles:
    cert, key = make_tls_files(tmp_path_factory.mktemp("tls"))
    return TlsFiles(cert=cert, key=key, ca=cert)


def test_tls_node_accepts_tls_clients_only(tmp_path, tls_files):
    receiver, table, _ = start(tmp_path, tls=tls_files)
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_files.cert))
        # The node asks for a client certificate signed by --tls-ca (here: the same self-signed one).
        client.load_cert_chain(str(tls_files.cert), str(tls_files.key))
        assoc = associate(receiver.port, contexts=(Verification,), tls=(client, "127.0.0.1"))
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert not associate(receiver.port, contexts=(Verification,)).is_established
        without_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_files.cert))
        assert not associate(receiver.port, contexts=(Verification,), tls=(without_cert, "127.0.0.1")).is_established
    finally:
        receiver.stop()
        table.close()


def test_unreadable_tls_files_are_a_one_line_error(tmp_path):
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate")
    with pytest.raises(NodeError, match="cannot use the TLS files"):
        start(tmp_path, tls=TlsFiles(cert=bad, key=bad))


def test_a_host_not_allowed_is_closed_at_accept_and_logged(tmp_path, caplog):
    receiver, table, _ = start(tmp_path, allowed_hosts=(ipaddress.ip_network("10.0.0.0/8"),))
    try:
        with caplog.at_level(logging.INFO, logger="spleen_seg.node"):
            assert not associate(receiver.port, contexts=(Verification,)).is_established
        assert any('event=connection result=refused address=127.0.0.1 reason="address not in --allowed-hosts"'
                   in r.message for r in caplog.records)
    finally:
        receiver.stop()
        table.close()
    receiver, table, _ = start(tmp_path / "2", allowed_hosts=(ipaddress.ip_network("127.0.0.1"),))
    try:
        assoc = associate(receiver.port, contexts=(Verification,))
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()
    finally:
        receiver.stop()
        table.close()


def test_a_dataset_over_the_limit_drops_the_peer_and_stores_nothing(tmp_path, caplog):
    limit = 4000
    receiver, table, spool = start(tmp_path, max_instance_bytes=limit)
    try:
        (big,) = [pydicom.dcmread(p) for p in write_series(tmp_path / "big", random_volume(shape=(64, 64, 1)))]
        with caplog.at_level(logging.INFO, logger="spleen_seg.node"):
            assoc = associate(receiver.port)
            assert assoc.is_established
            assert "Status" not in assoc.send_c_store(big)  # no answer: the association was aborted
            wait_for(lambda: assoc.is_aborted)
        assert any("event=connection result=dropped address=127.0.0.1" in r.message
                   and f"sent a dataset larger than {limit} bytes" in r.message for r in caplog.records)
        assert table.jobs() == [] and list(spool.series_root.iterdir()) == []
        assert store_all(receiver.port, ct_series(tmp_path / "small", n=1)) == [0]  # the node serves on
    finally:
        receiver.stop()
        table.close()


def finish(table: JobTable, now: float) -> None:
    """The receiving series' job completes and is done (no targets), at ``now``."""
    table.complete_quiet(now, 0.0)
    job = table.claim_next(now)
    table.finish_processing(job.id, [], (), now)


NOW = 1_700_000_000.0
OLD = NOW - 8 * SECONDS_PER_DAY


def test_over_the_spool_quota_answers_out_of_resources_loses_nothing_and_accepts_again_once_space_is_back(tmp_path):
    receiver, table, spool = start(tmp_path)
    try:
        receiver.clock = lambda: OLD
        held = ct_series(tmp_path / "a", n=3, series_uid="1.2.826.0.1.3680043.2.10")
        assert store_all(receiver.port, held) == [0, 0, 0]
        finish(table, OLD)
        receiver.settings = replace(receiver.settings, spool_quota_bytes=spool.instance_bytes())  # full
        receiver.clock = lambda: NOW
        late = ct_series(tmp_path / "b", n=1, series_uid="1.2.826.0.1.3680043.2.11")
        assert store_all(receiver.port, late) == [STATUS_OUT_OF_RESOURCES]
        paths = table.series_paths("1.2.826.0.1.3680043.2.10")
        assert len(paths) == 3 and all((spool.root / p).is_file() for p in paths)  # nothing acknowledged lost
        assert [job.series_key for job in table.jobs()] == ["1.2.826.0.1.3680043.2.10"]
        assert list(spool.incoming.iterdir()) == []
        assert purge_expired(table, spool, keep_days=7, now=NOW) == ["1.2.826.0.1.3680043.2.10"]  # space is back
        assert store_all(receiver.port, late) == [0]
        (path,) = table.series_paths("1.2.826.0.1.3680043.2.11")
        assert (spool.root / path).is_file()
    finally:
        receiver.stop()
        table.close()


def test_instances_over_the_series_limit_answer_out_of_resources(tmp_path, monkeypatch):
    receiver, table, spool = start(tmp_path, max_series_instances=2)
    written = []
    write = spool.write_instance
    monkeypatch.setattr(spool, "write_instance", lambda *args, **kw: written.append(args[1]) or write(*args, **kw))
    try:
        series = ct_series(tmp_path / "in", n=3)
        assert store_all(receiver.port, series) == [0, 0, STATUS_OUT_OF_RESOURCES]
        # the full series is refused before the third instance is written (no write, no fsync)
        assert written == [str(ds.SOPInstanceUID) for ds in series[:2]]
        (job,) = table.jobs()
        assert job.instances == 2 and len(table.series_paths(job.series_key)) == 2
        assert len(list(spool.series_root.rglob("*.dcm"))) == 2 and list(spool.incoming.iterdir()) == []
    finally:
        receiver.stop()
        table.close()


@pytest.fixture
def finished_old_series(tmp_path):
    """A node whose one series (3 instances) finished 8 days ago: expired under --keep-days 7."""
    receiver, table, spool = start(tmp_path)
    receiver.clock = lambda: OLD
    series = ct_series(tmp_path / "in", n=4, series_uid="1.2.826.0.1.3680043.2.20")
    assert store_all(receiver.port, series[:3]) == [0, 0, 0]
    finish(table, OLD)
    receiver.clock = lambda: NOW
    yield receiver, table, spool, series[3]
    receiver.stop()
    table.close()


def test_an_instance_acknowledged_after_retention_chose_its_series_is_kept(finished_old_series, monkeypatch):
    receiver, table, spool, late = finished_old_series
    choose = table.expired_series
    acknowledged = []

    def choose_then_receive(cutoff: float):
        chosen = choose(cutoff)
        assert list(chosen) == ["1.2.826.0.1.3680043.2.20"]
        acknowledged.extend(store_all(receiver.port, [late]))  # between the choice and the deletion
        return chosen

    monkeypatch.setattr(table, "expired_series", choose_then_receive)
    purge_expired(table, spool, keep_days=7, now=NOW)
    assert acknowledged == [0]
    late_file = spool.series_folder("1.2.826.0.1.3680043.2.20") / f"{late.SOPInstanceUID}.dcm"
    assert late_file.is_file(), "an acknowledged instance was deleted by retention"
    assert table.jobs()[0].state == "receiving" and len(table.series_paths("1.2.826.0.1.3680043.2.20")) == 4


def test_an_instance_written_but_not_yet_recorded_when_retention_runs_is_not_acknowledged(finished_old_series,
                                                                                          monkeypatch):
    receiver, table, spool, late = finished_old_series
    write = spool.write_instance
    written, go = threading.Event(), threading.Event()

    def write_then_wait(*args, **kwargs):
        path = write(*args, **kwargs)
        written.set()
        assert go.wait(TIMEOUT_S)
        return path

    monkeypatch.setattr(spool, "write_instance", write_then_wait)
    statuses: list[int] = []
    sender = threading.Thread(target=lambda: statuses.extend(store_all(receiver.port, [late])))
    sender.start()
    assert written.wait(TIMEOUT_S)
    assert purge_expired(table, spool, keep_days=7, now=NOW) == ["1.2.826.0.1.3680043.2.20"]
    go.set()
    sender.join(TIMEOUT_S)
    late_file = spool.series_folder("1.2.826.0.1.3680043.2.20") / f"{late.SOPInstanceUID}.dcm"
    assert statuses[0] != 0 or late_file.is_file(), "an acknowledged instance was deleted by retention"
    assert statuses == [STATUS_OUT_OF_RESOURCES] and not table.has_instance(str(late.SOPInstanceUID))
    monkeypatch.undo()
    assert store_all(receiver.port, [late]) == [0]  # the sender's retry
    assert late_file.is_file() and table.series_paths("1.2.826.0.1.3680043.2.20") == [spool.relative(late_file)]


def test_a_silent_tls_connection_does_not_stop_others_and_is_dropped_after_the_idle_timeout(tmp_path, tls_files, caplog):
    idle_s = 0.5
    receiver, table, _ = start(tmp_path, tls=tls_files, idle_timeout_seconds=idle_s)
    try:
        with caplog.at_level(logging.INFO, logger="spleen_seg.node"), \
                socket.create_connection(("127.0.0.1", receiver.port)) as silent:
            status, seconds = tls_echo(receiver.port, tls_files.cert, tls_files.key, TIMEOUT_S)
            assert status == 0 and seconds < 2 * idle_s + 1
            silent.settimeout(TIMEOUT_S)
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the node
            assert time.monotonic() - started < idle_s + 1
        connection_lines = [r.getMessage() for r in caplog.records if "event=connection" in r.getMessage()]
        assert any("result=dropped address=127.0.0.1" in line and f"no TLS handshake within {idle_s:g} s" in line
                   for line in connection_lines), connection_lines
    finally:
        receiver.stop()
        table.close()
