"""Sending results: C-STORE to each destination (pynetdicom SCU), optionally STOW-RS (dicomweb-client).

The outbox is the ``results`` table: a row is marked sent only once the target
confirmed it (C-STORE success or warning status, STOW-RS success), and a failed send
is retried with exponential backoff, without limit, across restarts: results wait in
the spool until the destination is back. The one case where a result can reach a
target twice is a kill between the target's confirmation and the commit that records
it; the resend carries the same SOP Instance UID, which a PACS stores once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from spleen_seg.node.bookkeeper import log_event, log_job
from spleen_seg.node.jobs import Job, JobTable, Result
from spleen_seg.node.settings import NodeSettings, parse_destination
from spleen_seg.node.spool import Spool

logger = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 300.0
# Network, ACSE and DIMSE timeouts of one send association.
SEND_TIMEOUT_SECONDS = 30.0
# C-STORE statuses that mean stored: success and the warnings (coercion, elements
# discarded, data set does not match SOP class) under which the instance was kept.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

# One error (or None for sent) per file, in order.
Sender = Callable[[str, list[Dataset]], list[str | None]]


def backoff_seconds(attempts: int) -> float:
    """Wait before the next try after ``attempts`` failed tries: 2 s, 4 s, 8 s, ... capped at 5 minutes."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(attempts - 1, 0))


def cstore(target: str, calling_ae: str, datasets: list[Dataset]) -> list[str | None]:
    """Send ``datasets`` to ``target`` (``AE@HOST:PORT``) over one association."""
    from pynetdicom import AE

    destination = parse_destination(target)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SEND_TIMEOUT_SECONDS
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == sop_class}
        ae.add_requested_context(sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = getattr(assoc.acceptor.primitive, "reason_str", "") or "no reason given"
            error = f"association rejected by {target} ({reason})"
        else:
            error = f"no association with {target} (no connection: refused, timed out or aborted)"
        return [error] * len(datasets)
    errors: list[str | None] = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as err:  # no accepted presentation context for it
                errors.append(f"{target} refused {ds.SOPClassUID.name}: {err}")
                continue
            code = status.get("Status") if status else None
            if code is None:
                errors.append(f"no response from {target} (connection lost or timed out)")
            elif int(code) in STORED_STATUSES:
                errors.append(None)
            else:
                errors.append(f"{target} answered C-STORE status 0x{int(code):04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return errors + [f"association with {target} ended early"] * (len(datasets) - len(errors))


def stow(url: str, datasets: list[Dataset]) -> list[str | None]:
    """Send ``datasets`` to the DICOMweb server at ``url`` by STOW-RS, one request each."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url)
    errors: list[str | None] = []
    for ds in datasets:
        try:
            response = client.store_instances(datasets=[ds])
        except (requests.RequestException, OSError) as err:
            errors.append(f"STOW-RS to {url} failed: {err}")
            continue
        failed = response.get("FailedSOPSequence") if response is not None else None
        errors.append(f"STOW-RS to {url} refused the instance (FailedSOPSequence)" if failed else None)
    return errors


def default_sender(calling_ae: str) -> Sender:
    """C-STORE for ``AE@HOST:PORT`` targets, STOW-RS for URLs."""
    def send(target: str, datasets: list[Dataset]) -> list[str | None]:
        if target.startswith(("http://", "https://")):
            return stow(target, datasets)
        return cstore(target, calling_ae, datasets)
    return send


def send_due(table: JobTable, spool: Spool, settings: NodeSettings, clock: Callable[[], float] = time.time,
             sender: Sender | None = None) -> list[Job]:
    """Send every result whose attempt is due, one association per target; returns the jobs now done."""
    sender = sender or default_sender(settings.ae_title)
    by_target: dict[str, list[Result]] = {}
    for result in table.due_results(clock()):
        by_target.setdefault(result.target, []).append(result)
    done: list[Job] = []
    for target, results in by_target.items():
        readable: list[tuple[Result, Dataset]] = []
        lost_jobs: set[int] = set()
        for result in results:
            try:
                readable.append((result, pydicom.dcmread(spool.root / result.path)))
            except (OSError, InvalidDicomError) as err:
                # Only an outside hand removes a recorded result (they are fsync'd first).
                table.fail(result.job_id, f"result file {result.path} unreadable ({err}); send the series again",
                           clock())
                lost_jobs.add(result.job_id)
                log_job(logger, table.job(result.job_id))
        readable = [(result, ds) for result, ds in readable if result.job_id not in lost_jobs]
        if not readable:
            continue
        start = time.monotonic()
        try:
            errors = sender(target, [ds for _, ds in readable])
        # Whatever breaks a send (a library error on an odd peer response), the results must
        # get their retry time, not be retried in a tight loop: record it as this send's error.
        except Exception as err:  # noqa: BLE001
            logger.exception("sending to %s failed", target)
            errors = [f"sending failed: {err.__class__.__name__}: {err}"] * len(readable)
        now = clock()
        for (result, _), error in zip(readable, errors, strict=True):
            if error is None:
                job = table.mark_sent(result.id, now)
                if job is not None:
                    done.append(job)
            else:
                table.mark_retry(result.id, error, now + backoff_seconds(result.attempts + 1), now)
        failures = [e for e in errors if e is not None]
        log_event(logger, "send", level=logging.WARNING if failures else logging.INFO, target=target,
                  jobs=",".join(sorted({str(r.job_id) for r, _ in readable})), sent=len(errors) - len(failures),
                  failed=len(failures), error=failures[0] if failures else "",
                  retry_in=round(backoff_seconds(readable[0][0].attempts + 1), 1) if failures else "",
                  seconds=round(time.monotonic() - start, 3))
    for job in done:
        log_job(logger, job)
    return done
