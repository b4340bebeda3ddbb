"""``spleen-seg serve``: the node's stages in one process around one job table.

Threads: the receiver's (pynetdicom, one per association), one processor (the model is
loaded once; jobs run one at a time in completion order), one dispatcher (sends), and
the main thread, which completes quiet series and applies retention. Start-up recovers
from whatever stopped the previous run, SIGKILL included (see ``recover``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from spleen_seg.node.bookkeeper import log_event, log_job, purge_expired
from spleen_seg.node.dispatcher import SEND_TIMEOUT_SECONDS, send_due
from spleen_seg.node.jobs import JobTable
from spleen_seg.node.processor import load_model, process_next
from spleen_seg.node.receiver import Receiver
from spleen_seg.node.router import complete_quiet_series, tick_seconds
from spleen_seg.node.settings import NodeSettings, format_size
from spleen_seg.node.spool import Spool

logger = logging.getLogger("spleen_seg.node")

# A series whose processing was interrupted this many times (the node killed or crashed
# while segmenting it) is failed instead of crashing the node again and again.
MAX_PROCESS_ATTEMPTS = 3
OWNER_ONLY_UMASK = 0o077
IDLE_WAIT_SECONDS = 1.0
RETENTION_INTERVAL_SECONDS = 60.0
# Libraries whose INFO lines would repeat ours or name dataset contents.
QUIET_LOGGERS = ("pynetdicom", "highdicom")
LOG_FORMAT = "%(asctime)s level=%(levelname)s %(message)s"


class _StructuredLines(logging.Filter):
    """Lines from elsewhere (pynetdicom's connection errors, the model export) in the node's structured form."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(logger.name):
            record.msg = f"event=log logger={record.name} message={json.dumps(record.getMessage())}"
            record.args = ()
        return True


def configure_logging() -> None:
    """Timestamped structured lines on the handlers the CLI set up; library chatter to warnings."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_StructuredLines())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def recover(table: JobTable, spool: Spool, now: float) -> None:
    """Make the spool consistent after any stop, SIGKILL included.

    - files a kill left half-written, or renamed but never recorded (their C-STORE was
      not acknowledged, so the sender still has them), are removed;
    - jobs caught ``segmenting`` are complete again and processed anew (their partial
      results are removed); ``receiving`` jobs complete after their quiet period;
    - results not yet confirmed by their target are sent at once.
    """
    requeued, failed = table.recover(now, MAX_PROCESS_ATTEMPTS)
    removed = spool.remove_strays(table.instance_paths())
    spool.remove_partial_results(table.jobs_with_results())
    for job in requeued + failed:
        log_job(logger, job, recovered=True)
    pending = len(table.due_results(now))
    log_event(logger, "node", state="recovered", requeued=len(requeued), failed=len(failed),
              stray_files_removed=removed, results_to_send=pending)


def _worker(name: str, stop: threading.Event, wake: threading.Event, step: Callable[[], bool]) -> threading.Thread:
    """A thread that runs ``step`` while it has work, else waits for ``wake`` (or a second)."""
    def run() -> None:
        while not stop.is_set():
            try:
                busy = step()
            # A worker that dies leaves the node receiving but never processing or sending;
            # log the error (with traceback) and carry on with the next job.
            except Exception:  # noqa: BLE001
                logger.exception("%s: unexpected error", name)
                busy = False
            if not busy:
                wake.wait(IDLE_WAIT_SECONDS)
                wake.clear()
    thread = threading.Thread(target=run, name=f"spleen-seg-{name}", daemon=True)
    thread.start()
    return thread


def serve(settings: NodeSettings, clock: Callable[[], float] = time.time) -> int:
    """Run the node until SIGTERM or SIGINT; returns the exit status (0).

    Raises ``NodeError`` when it cannot start (port in use, spool locked or not ours).
    """
    from spleen_seg.pipeline.network import default_segment_weights

    default_segment_weights(settings.weights)  # no weights: a one-line error before anything starts
    os.umask(OWNER_ONLY_UMASK)  # spool files, database and its WAL: owner-only
    configure_logging()
    spool = Spool(settings.spool).create()
    spool.lock()
    table = JobTable(spool.db_path)
    stop = threading.Event()
    wake_processor, wake_dispatcher = threading.Event(), threading.Event()
    receiver = Receiver(settings, spool, table, clock=clock)
    threads: list[threading.Thread] = []

    def on_signal(signum: int, _frame) -> None:
        log_event(logger, "node", state="stopping", signal=signal.Signals(signum).name)
        stop.set()
        wake_processor.set()
        wake_dispatcher.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        recover(table, spool, clock())
        receiver.start()
        log_event(logger, "node", state="listening", ae_title=settings.ae_title, host=settings.host,
                  port=receiver.port, allowed_callers=",".join(settings.allowed_callers) or "any",
                  allowed_hosts=",".join(map(str, settings.allowed_hosts)) or "any",
                  max_connections=settings.connection_limit, idle_timeout=settings.idle_timeout_seconds,
                  max_instance_size=format_size(settings.max_instance_bytes),
                  spool_quota=format_size(settings.spool_quota_bytes), max_series_instances=settings.max_series_instances,
                  targets=",".join(settings.targets) or "none (results stay in the spool)",
                  quiet_seconds=settings.quiet_seconds, keep_days=settings.keep_days, tls=settings.tls is not None,
                  spool=settings.spool, pid=os.getpid())

        def dispatch() -> bool:
            return bool(send_due(table, spool, settings, clock))

        threads.append(_worker("dispatcher", stop, wake_dispatcher, dispatch))
        loaded = load_model(settings)
        log_event(logger, "node", state="model_loaded", device=loaded.model["device"],
                  backend=loaded.model["backend"], weights_sha256=str(loaded.model["weights_sha256"])[:16])

        def process() -> bool:
            job = process_next(table, spool, loaded, settings, clock)
            if job is not None and job.state == "sending":
                wake_dispatcher.set()
            return job is not None

        threads.append(_worker("processor", stop, wake_processor, process))
        _main_loop(settings, table, spool, stop, wake_processor, clock)
    finally:
        stop.set()
        receiver.stop()
        wake_processor.set()
        wake_dispatcher.set()
        for thread in threads:
            thread.join(timeout=SEND_TIMEOUT_SECONDS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        table.close()
        spool.unlock()
        log_event(logger, "node", state="stopped")
    return 0


def _main_loop(settings: NodeSettings, table: JobTable, spool: Spool, stop: threading.Event,
               wake_processor: threading.Event, clock: Callable[[], float]) -> None:
    """Complete quiet series and apply retention until ``stop``."""
    tick = tick_seconds(settings.quiet_seconds)
    next_retention = 0.0
    while not stop.wait(tick):
        now = clock()
        if complete_quiet_series(table, now, settings.quiet_seconds):
            wake_processor.set()
        if now >= next_retention:
            for series_key in purge_expired(table, spool, settings.keep_days, now):
                log_event(logger, "retention", series=series_key, keep_days=settings.keep_days)
            next_retention = now + RETENTION_INTERVAL_SECONDS
