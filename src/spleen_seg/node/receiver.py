"""The node's Storage SCP (pynetdicom): C-ECHO, and C-STORE of CT images into the spool.

A C-STORE is answered with success only once the instance is durable (spool file
fsync'd and renamed, job-table row committed); any failure before that is answered
with a failure status, so the sender keeps the instance and can send it again.
Associations are accepted from the allowed calling AE titles only (when given), for
the node's own AE title, and up to ``max_associations`` at a time; what a peer may cost
before that (connections, allowed hosts, PDU and dataset sizes, timeouts, the TLS
handshake) is bounded by ``transport.GuardedServer``. The spool's quota (bytes of
received instances, instances per series) is answered with Out of Resources, which
the sender retries. Presentation
contexts are CT Image Storage and Enhanced CT Image Storage in every transfer syntax
that pydicom can decode here, plus Verification; other SOP classes are refused at
negotiation, as a DICOM SCP does for what it cannot store.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, DeflatedExplicitVRLittleEndian, EnhancedCTImageStorage, generate_uid

from spleen_seg.errors import NodeError
from spleen_seg.node.bookkeeper import log_event
from spleen_seg.node.jobs import JobTable, NewInstance, RecordRefused
from spleen_seg.node.settings import NodeSettings, TlsFiles
from spleen_seg.node.spool import Spool, SpoolQuotaExceeded

if TYPE_CHECKING:
    from spleen_seg.node.transport import GuardedServer

logger = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"  # C-ECHO
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
# Below this much free space in the spool, instances are refused (out of resources) rather
# than filling the disk the job table and results also need.
MIN_FREE_BYTES = 512 * 1024**2


def decodable_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes whose pixel data pydicom can decode with the plugins installed here.

    This is exactly what ``segment`` reads, so the SCP never accepts an instance the
    processor cannot decode for lack of a codec.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    usable = []
    for syntax in AllTransferSyntaxes:
        try:
            if get_decoder(syntax).is_available:
                usable.append(syntax)
        except NotImplementedError:  # pydicom has no decoder at all for this syntax (video, JPIP)
            continue
    return usable


def derived_series_key(ds: Dataset) -> str:
    """A SeriesInstanceUID for instances that lack one (anonymised), the same for every slice of a series.

    Built from what the slices of one series share, like ``io.dicom.find_series``.
    """
    parts = [str(ds.get(keyword, "") or "") for keyword in
             ("StudyInstanceUID", "FrameOfReferenceUID", "Modality", "SeriesNumber", "SeriesDescription")]
    return generate_uid(entropy_srcs=["spleen-seg node series", *parts])


def instance_record(ds: Dataset, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str,
                    calling_ae: str, path: str = "") -> NewInstance:
    """The job-table record of a received dataset; the C-STORE request's UIDs are authoritative."""
    series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    return NewInstance(
        sop_instance_uid=sop_instance_uid,
        series_key=series_uid or derived_series_key(ds),
        study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
        path=path,
        sop_class_uid=sop_class_uid,
        transfer_syntax=transfer_syntax,
        calling_ae=calling_ae,
    )


def received_dataset(event: Any, max_pixel_bytes: int) -> Dataset:
    """The C-STORE request's data set, decoded; a Deflated one's header only, once its stream checked.

    pynetdicom inflates a Deflated data set whole to decode it: a 128 KiB instance of
    8192 x 8192 zero pixels cost 256 MiB. Here the header is read by the bounded reader,
    the declared pixel data must stay within ``max_pixel_bytes`` (the node's
    ``--max-instance-size``, the bound every other instance meets on the wire) and what the
    compressed bytes can hold, and the rest is inflated only to check it, counted and
    dropped (``io.dicom_files.check_deflated``). Raises what the decoder raises.
    """
    if event.context.transfer_syntax != DeflatedExplicitVRLittleEndian:
        return event.dataset
    from spleen_seg.io.dicom_files import check_deflated

    stream = event.request.DataSet
    stream.seek(0)
    return check_deflated(stream, "the received data set", max_pixel_bytes=max_pixel_bytes)


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """TLS for incoming associations; with a CA file, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
        if tls.ca is not None:
            context.load_verify_locations(cafile=str(tls.ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as err:
        raise NodeError(f"cannot use the TLS files {tls.cert}, {tls.key}"
                        f"{', ' + str(tls.ca) if tls.ca else ''}: {err}; pass PEM certificate and key files") from err
    return context


@dataclass
class _AssociationStats:
    calling_ae: str
    address: str
    started: float
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    echoes: int = 0
    series: set[str] = field(default_factory=set)
    refused_sop_classes: list[str] = field(default_factory=list)


class Receiver:
    """The Storage SCP of a node: ``start()`` listens in background threads, ``stop()`` closes it."""

    def __init__(self, settings: NodeSettings, spool: Spool, table: JobTable,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.spool = spool
        self.table = table
        self.clock = clock
        self._server: GuardedServer | None = None
        self._stats: dict[int, _AssociationStats] = {}
        self._stats_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (the real one when ``settings.port`` is 0)."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and listen; raises ``NodeError`` when the address is taken or not allowed."""
        from pynetdicom import AE, evt

        from spleen_seg.node.transport import GuardedServer, PeerLimits

        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.require_calling_aet = list(self.settings.allowed_callers)
        ae.require_called_aet = True
        # ARTIM (no association request), an established association left silent, a DIMSE reply.
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = self.settings.idle_timeout_seconds
        limits = PeerLimits(max_connections=self.settings.connection_limit,
                            idle_timeout_seconds=self.settings.idle_timeout_seconds,
                            max_pdata_bytes=ae.maximum_pdu_size, max_instance_bytes=self.settings.max_instance_bytes,
                            allowed_hosts=self.settings.allowed_hosts)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_ended), (evt.EVT_ABORTED, self._on_ended)]
        context = server_ssl_context(self.settings.tls) if self.settings.tls else None
        address = (self.settings.host, self.settings.port)
        try:
            server = cast(GuardedServer, ae.make_server(address, evt_handlers=handlers, ssl_context=context,
                                                        server_class=GuardedServer, limits=limits))
        except OSError as err:
            where = f"{self.settings.host}:{self.settings.port}"
            if err.errno == errno.EADDRINUSE:
                raise NodeError(f"port {where} is already in use (another DICOM node or a running spleen-seg "
                                "serve?); stop it or pass another --port") from None
            if err.errno == errno.EACCES:
                raise NodeError(f"not allowed to listen on {where} (ports below 1024 need privileges); "
                                "pass --port 11112 or another port above 1023") from None
            raise NodeError(f"cannot listen on {where}: {err.strerror}; check --host and --port") from None
        threading.Thread(target=server.serve_forever, name="spleen-seg-receiver", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # --- association events ----------------------------------------------------------------

    def _stats_for(self, event) -> _AssociationStats | None:
        with self._stats_lock:
            return self._stats.get(id(event.assoc))

    def _on_accepted(self, event) -> None:
        requestor = event.assoc.requestor
        stats = _AssociationStats(calling_ae=str(requestor.ae_title).strip(), address=str(requestor.address),
                                  started=time.monotonic())
        # Senders such as storescu propose every storage class they know; the refused ones are
        # worth naming only when nothing this node stores was accepted (a non-CT sender).
        accepted = {str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts}
        if not accepted & set(STORAGE_SOP_CLASSES):
            stats.refused_sop_classes = sorted({getattr(cx.abstract_syntax, "name", str(cx.abstract_syntax))
                                                for cx in event.assoc.rejected_contexts})
        with self._stats_lock:
            self._stats[id(event.assoc)] = stats

    def _on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        called = str(getattr(requestor.primitive, "called_ae_title", "")).strip()
        if self.settings.allowed_callers and calling not in self.settings.allowed_callers:
            reason = "calling AE title not allowed"
        elif called != self.settings.ae_title:
            reason = f"called AE title {called!r} is not this node's"
        else:
            reason = f"more than {self.settings.max_associations} associations at once"
        log_event(logger, "association", result="rejected", calling_ae=calling, address=requestor.address,
                  reason=reason, level=logging.WARNING)

    def _on_ended(self, event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        log_event(logger, "association", result="aborted" if event.event.name == "EVT_ABORTED" else "released",
                  calling_ae=stats.calling_ae, address=stats.address, stored=stats.stored,
                  duplicates=stats.duplicates, refused=stats.refused, echoes=stats.echoes,
                  series=",".join(sorted(stats.series)), refused_sop_classes=",".join(stats.refused_sop_classes),
                  seconds=round(time.monotonic() - stats.started, 3))

    def _on_echo(self, event) -> int:
        stats = self._stats_for(event)
        if stats is not None:
            stats.echoes += 1
        return STATUS_SUCCESS

    # --- C-STORE ------------------------------------------------------------------------------

    def _on_store(self, event) -> int:
        stats = self._stats_for(event)
        status, series_key, duplicate = self._store(event)
        if stats is not None:
            if status != STATUS_SUCCESS:
                stats.refused += 1
            elif duplicate:
                stats.duplicates += 1
            else:
                stats.stored += 1
                stats.series.add(series_key)
        return status

    def _store(self, event) -> tuple[int, str, bool]:
        """Spool one instance; returns (DICOM status, series key, whether it was a duplicate)."""
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID or "").strip()
        sop_class = str(request.AffectedSOPClassUID or "").strip()
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = received_dataset(event, self.settings.max_instance_bytes)
            record = instance_record(ds, sop_uid, sop_class, str(event.context.transfer_syntax), calling)
        # A peer's bytes can break the decoder in many ways pydicom does not type; whatever
        # it is, the answer is a failure status (the sender keeps the instance) and a log line.
        except Exception as err:  # noqa: BLE001
            log_event(logger, "instance", result="refused", calling_ae=calling, sop_instance_uid=sop_uid,
                      reason=f"undecodable dataset ({err.__class__.__name__}: {err})", level=logging.WARNING)
            return STATUS_CANNOT_UNDERSTAND, "", False
        if not sop_uid:
            log_event(logger, "instance", result="refused", calling_ae=calling, reason="no SOP Instance UID",
                      level=logging.WARNING)
            return STATUS_CANNOT_UNDERSTAND, record.series_key, False
        if self.table.is_duplicate(sop_uid):
            self.table.record_instance(record, self.clock())  # a duplicate only delays completion
            return STATUS_SUCCESS, record.series_key, True
        return self._spool(record, event.encoded_dataset())

    def _spool(self, record: NewInstance, data: bytes) -> tuple[int, str, bool]:
        """Write a new instance and record it; Out of Resources (retried by the sender) when the spool is full."""
        def refused(reason: str, level: int) -> tuple[int, str, bool]:
            log_event(logger, "instance", result="refused", calling_ae=record.calling_ae,
                      sop_instance_uid=record.sop_instance_uid, series=record.series_key, reason=reason, level=level)
            return STATUS_OUT_OF_RESOURCES, record.series_key, False

        free = shutil.disk_usage(self.spool.root).free
        if free < MIN_FREE_BYTES:
            return refused(f"spool disk nearly full ({free // 1024**2} MiB free)", logging.ERROR)
        path = None
        try:
            # a full series costs a read, not a write and an fsync (the transaction checks again)
            self.table.check_series_room(record, self.settings.max_series_instances)
            path = self.spool.write_instance(record.series_key, record.sop_instance_uid, data,
                                             quota_bytes=self.settings.spool_quota_bytes)
            job = self.table.record_instance(replace(record, path=path), self.clock(), file=self.spool.root / path,
                                             max_series_instances=self.settings.max_series_instances)
        except SpoolQuotaExceeded as err:
            return refused(str(err), logging.WARNING)
        except RecordRefused as err:
            # Rolled back: nothing refers to the file, which goes (the sender keeps the instance).
            if path is not None:
                self.spool.remove_instance(path)
            return refused(str(err), logging.WARNING)
        except (OSError, sqlite3.Error) as err:
            return refused(f"cannot write the spool ({err})", logging.ERROR)
        return STATUS_SUCCESS, record.series_key, job is None
