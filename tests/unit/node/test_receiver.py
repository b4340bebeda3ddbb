"""The Storage SCP in-process on 127.0.0.1 (no model): C-ECHO, durable C-STORE, duplicates,
calling/called AE filtering, non-CT SOP classes, association limit, TLS, port in use, disk full,
undecodable datasets, anonymised instances without UIDs."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from synthetic_dicom import random_volume, write_series

from spleen_seg.errors import NodeError
from spleen_seg.node import receiver as receiver_module
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
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (needed to make a test certificate)")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(folder / "key.pem"),
                    "-out", str(folder / "cert.pem")], check=True, capture_output=True, timeout=60)
    return TlsFiles(cert=folder / "cert.pem", key=folder / "key.pem", ca=folder / "cert.pem")


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
