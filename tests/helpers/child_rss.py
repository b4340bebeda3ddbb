"""Run a command as a child process and measure its peak RSS, killing it past a bound.

The peak is the kernel's high-water mark of the child's own memory (``VmHWM`` in
``/proc/<pid>/status``), read every ``POLL_S`` while it runs. Not ``ru_maxrss`` from
``os.wait4``: Linux carries the parent's high-water mark into a forked child across
``exec``, so a child of a 700 MiB pytest process reports at least 700 MiB whatever it
used; for the same reason ``VmHWM`` counts only once the child runs the command (its
``/proc/<pid>/cmdline`` is the command's), not while it is still a copy of this process.
A watchdog kills the child with SIGKILL once its RSS passes ``kill_above_bytes``,
so that a test of a memory bound that fails (the code before a fix) costs this shared
machine that much memory, not what the child would have taken.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.02
KIB = 1024


def _runs(pid: int, args: list[str]) -> bool:
    """Whether ``pid`` has executed ``args`` (before exec it is a copy of this process)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [os.fsencode(a) for a in args]
    except OSError:
        return False


def _memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def kib(name: str) -> int:
        return int(fields.get(name, "0 kB").split()[0])

    return kib("VmRSS"), kib("VmHWM")


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int
    killed: bool  # by the watchdog, past kill_above_bytes


def run_measured(args: list[str], *, cwd: Path, env: dict[str, str], kill_above_bytes: int,
                 timeout_s: float) -> Measured:
    """Run ``args``; its exit status, output, wall seconds, peak RSS, and whether the watchdog killed it.

    The watchdog also kills the child after ``timeout_s`` (then ``killed`` is False and
    the return code is -9).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()
    finished = threading.Event()
    peak_kib = [0]

    def watch() -> None:
        started = False
        while not finished.wait(POLL_S):
            started = started or _runs(proc.pid, args)
            rss_kib, high_kib = _memory_kib(proc.pid)
            if started:
                peak_kib[0] = max(peak_kib[0], high_kib)
            over = rss_kib * KIB > kill_above_bytes
            if over or time.perf_counter() - start > timeout_s:
                if over:
                    killed.set()
                os.kill(proc.pid, signal.SIGKILL)
                return

    outputs: dict[str, str] = {}

    def drain(name: str) -> None:
        with getattr(proc, name) as stream:
            outputs[name] = stream.read()

    threads = [threading.Thread(target=watch, daemon=True),
               *(threading.Thread(target=drain, args=(name,), daemon=True) for name in ("stdout", "stderr"))]
    for thread in threads:
        thread.start()
    # Reaped only once the watchdog stopped reading its /proc entry (a reused pid is another process).
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    finished.set()
    threads[0].join()
    _, status, _ = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for thread in threads:
        thread.join(timeout=timeout_s)
    return Measured(returncode=proc.returncode, stdout=outputs.get("stdout", ""), stderr=outputs.get("stderr", ""),
                    seconds=seconds, peak_rss_bytes=peak_kib[0] * KIB, killed=killed.is_set())
