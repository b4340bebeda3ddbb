"""Deflated instances sent to the Storage SCP for real (issue 15, item 3): a 128 KiB instance
that inflates to 128 MiB is checked by the bounded reader, never inflated whole; what declares
more pixel data than the limit, or inflates beyond what it declares, is refused and logged.

The sender is pynetdicom with chunked sending: the file's deflated bytes go out as they are,
so the only inflating in this process is the node's. tracemalloc sees every thread's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from memory_trace import traced_peak
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from synthetic_dicom import write_deflated_bomb_series

from spleen_seg.io.dicom_files import read_dataset
from spleen_seg.node import receiver as receiver_module
from spleen_seg.node.jobs import JobTable
from spleen_seg.node.receiver import STATUS_CANNOT_UNDERSTAND, STATUS_SUCCESS, Receiver
from spleen_seg.node.settings import NodeSettings
from spleen_seg.node.spool import Spool

TIMEOUT_S = 10
MB = 1 << 20
BOMB_PIXEL_BYTES = 8192 * 8192 * 2
# The node's own allocations while it receives one instance: PDUs, the received bytes (128 KiB),
# its header. pynetdicom's decoding inflated 256 MiB.
TRACED_MAX = 16 * MB


@pytest.fixture
def node(tmp_path, request):
    """A receiver; ``@pytest.mark.parametrize("node", [max_instance_bytes], indirect=True)`` sets its limit."""
    spool = Spool(tmp_path / "spool").create()
    table = JobTable(spool.db_path)
    limits = {"max_instance_bytes": request.param} if hasattr(request, "param") else {}
    receiver = Receiver(NodeSettings(spool=spool.root, host="127.0.0.1", port=0, **limits), spool, table)
    receiver.start()
    yield receiver, table
    receiver.stop()
    table.close()


def send_file(port: int, path: Path, monkeypatch) -> int:
    """C-STORE of ``path``'s encoded bytes as stored (Deflated), not decoded on this side."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPLEENSEG")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def traced_send(port: int, path: Path, monkeypatch) -> tuple[int, int]:
    return traced_peak(lambda: send_file(port, path, monkeypatch))


def test_a_deflated_bomb_within_the_limit_is_stored_without_being_inflated(node, tmp_path, monkeypatch):
    receiver, table = node
    (bomb,) = write_deflated_bomb_series(tmp_path / "bomb", 1)
    status, traced = traced_send(receiver.port, bomb, monkeypatch)
    assert status == STATUS_SUCCESS
    assert traced < TRACED_MAX, f"{traced / MB:.0f} MiB traced to receive a 128 KiB instance"
    (job,) = table.jobs()
    assert job.instances == 1
    (stored,) = [p for p in receiver.spool.series_folder(job.series_key).iterdir() if p.is_file()]
    header = read_dataset(stored, stop_before_pixels=True)  # spooled as sent: still Deflated, 128 KiB
    assert (header.Rows, header.Columns) == (8192, 8192)
    assert header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored.stat().st_size < 2 * bomb.stat().st_size


@pytest.mark.parametrize("node", [64 * MB], indirect=True)
def test_a_deflated_instance_declaring_more_than_the_limit_is_refused_and_logged(node, tmp_path, monkeypatch, caplog):
    """--max-instance-size bounds what a Deflated instance declares, as it bounds every instance's bytes."""
    receiver, table = node
    (bomb,) = write_deflated_bomb_series(tmp_path / "bomb", 1)
    with caplog.at_level(logging.WARNING, logger=receiver_module.__name__):
        status, traced = traced_send(receiver.port, bomb, monkeypatch)
    assert status == STATUS_CANNOT_UNDERSTAND
    assert traced < TRACED_MAX
    assert table.jobs() == []
    (line,) = [r.getMessage() for r in caplog.records if "event=instance" in r.getMessage()]
    assert "result=refused" in line and "calling_ae=PACS" in line
    assert "InflateError: the header declares 8192 x 8192 pixels x 1 frames of 16 bits (134.2 MB of pixel data), " \
           "more than the 67.1 MB allowed" in line


def test_a_deflated_instance_inflating_beyond_its_header_is_refused(node, tmp_path, monkeypatch, caplog):
    """The header says 64 x 64 pixels; the stream holds 128 MiB: refused once 1 MiB past the declared size."""
    receiver, table = node
    (liar,) = write_deflated_bomb_series(tmp_path / "liar", 1, rows=64, columns=64, zero_bytes=BOMB_PIXEL_BYTES)
    with caplog.at_level(logging.WARNING, logger=receiver_module.__name__):
        status, traced = traced_send(receiver.port, liar, monkeypatch)
    assert status == STATUS_CANNOT_UNDERSTAND
    assert traced < TRACED_MAX
    assert table.jobs() == []
    assert any("more than its header declares" in r.getMessage() for r in caplog.records)
