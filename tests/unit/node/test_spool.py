"""The spool: owner-only folders and files, durable names, safe file names from UIDs,
clean-up of what a kill left, and the one-node-per-spool lock (released by SIGKILL)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from spleen_seg.errors import NodeError
from spleen_seg.node.spool import Spool, safe_name

LOCK_WAIT_S = 20.0


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_folders_are_owner_only_even_when_they_existed(tmp_path):
    (tmp_path / "spool").mkdir(mode=0o755)
    os.chmod(tmp_path / "spool", 0o755)
    spool = Spool(tmp_path / "spool").create()
    for folder in (spool.root, spool.incoming, spool.series_root, spool.results):
        assert mode(folder) == 0o700, folder


def test_instance_is_written_under_its_series_with_owner_only_mode(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    rel = spool.write_instance("1.2.3", "1.2.3.4", b"DICM-bytes")
    assert rel == "series/1.2.3/1.2.3.4.dcm"
    path = spool.root / rel
    assert path.read_bytes() == b"DICM-bytes"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert list(spool.incoming.iterdir()) == []  # the temporary file was renamed


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/../3", "", "1.2.3 ", "a" * 80, "1..2"])
def test_unsafe_uids_become_hashed_names(uid):
    name = safe_name(uid)
    assert name.startswith("x") and len(name) == 41 and "/" not in name and ".." not in name
    assert safe_name(uid) == name  # deterministic


def test_plain_uid_is_its_own_name():
    assert safe_name("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"


def test_remove_strays_keeps_only_recorded_instances(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    kept = spool.write_instance("1.2", "1.2.1", b"a")
    spool.write_instance("1.2", "1.2.2", b"b")  # renamed, never committed: a kill in between
    (spool.incoming / "tmpabc.part").write_bytes(b"half")
    assert spool.remove_strays({kept}) == 2
    assert [p.name for p in spool.series_folder("1.2").iterdir()] == ["1.2.1.dcm"]
    assert list(spool.incoming.iterdir()) == []


def test_remove_partial_results_keeps_jobs_with_results(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    for job in (1, 2):
        spool.result_folder(job).mkdir()
    (spool.results / ".job-000003.partial-99").mkdir()
    spool.remove_partial_results({1})
    assert [p.name for p in spool.results.iterdir()] == ["job-000001"]


def test_second_node_on_the_same_spool_is_refused(tmp_path):
    first = Spool(tmp_path / "spool").create()
    first.lock()
    try:
        with pytest.raises(NodeError, match=f"in use by a running node \\(pid {os.getpid()}\\)"):
            Spool(tmp_path / "spool").create().lock()
    finally:
        first.unlock()
    second = Spool(tmp_path / "spool")
    second.lock()
    second.unlock()


def test_lock_of_a_killed_node_is_released(tmp_path):
    Spool(tmp_path / "spool").create()
    code = (f"from spleen_seg.node.spool import Spool; s = Spool({str(tmp_path / 'spool')!r}); s.lock(); "
            "print('locked', flush=True); import time; time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(NodeError, match="in use"):
            Spool(tmp_path / "spool").lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=LOCK_WAIT_S)
    spool = Spool(tmp_path / "spool")
    spool.lock()  # no stale lock: the kernel released it with the process
    spool.unlock()


def test_spool_of_another_user_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(NodeError, match="belongs to another user"):
        Spool(tmp_path / "spool").create()
