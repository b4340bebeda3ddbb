"""The spool: owner-only folders and files, durable names, safe file names from UIDs,
clean-up of what a kill left, and the one-node-per-spool lock (released by SIGKILL)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest
from node_harness import snapshot

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


def someone_elses_folder(root):
    """A folder with spool-like sub-folders of someone else's (the issue's example)."""
    (root / "results").mkdir(parents=True)
    (root / "series" / "1.2").mkdir(parents=True)
    (root / "results" / "thesis.docx").write_bytes(b"a year of work")
    (root / "series" / "1.2" / "3.dcm").write_bytes(b"DICM someone's instance")
    (root / "notes.txt").write_text("mine")
    for path in (root, root / "results", root / "series"):
        os.chmod(path, 0o755)
    return root


def test_a_folder_that_is_no_spool_is_refused_and_left_byte_for_byte(tmp_path):
    folder = someone_elses_folder(tmp_path / "data")
    before = snapshot(folder)
    with pytest.raises(NodeError, match=r"is not a spleen-seg spool \(it holds notes.txt, results, series and no "
                                        r"spleen-seg-spool.json\); nothing in it was touched"):
        Spool(folder).create()
    assert snapshot(folder) == before


def test_spool_names_around_a_database_that_is_no_job_table_are_refused_untouched(tmp_path):
    import sqlite3

    folder = tmp_path / "data"
    folder.mkdir()
    db = sqlite3.connect(folder / "jobs.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")  # even a read-only open would add -wal and -shm files here
    db.execute("CREATE TABLE jobs (x)")
    db.close()
    (folder / "series").mkdir()
    before = snapshot(folder)
    with pytest.raises(NodeError, match="is not a spleen-seg spool"):
        Spool(folder).create()
    assert snapshot(folder) == before


@pytest.mark.parametrize("killed", [False, True])
def test_a_spool_made_before_the_marker_opens_and_gets_one(tmp_path, killed):
    """The current layout without the marker: recognised by its names and its job table (also when the
    node that made it was killed, its job table then partly in the WAL file)."""
    from spleen_seg.node.spool import MARKER_FILENAME

    root = tmp_path / "spool"
    code = (f"from spleen_seg.node.spool import Spool; from spleen_seg.node.jobs import JobTable, NewInstance; "
            f"import os, signal; s = Spool({str(root)!r}).create(); t = JobTable(s.db_path); "
            "p = s.write_instance('1.2', '1.2.1', b'x'); t.record_instance(NewInstance('1.2.1', '1.2', '', p, '', '', "
            "'PACS'), 1.0); os.remove(s.marker); " + ("os.kill(os.getpid(), signal.SIGKILL)" if killed else "t.close()"))
    subprocess.run([sys.executable, "-c", code], check=not killed, timeout=LOCK_WAIT_S)
    assert not (root / MARKER_FILENAME).exists() and (root / "jobs.sqlite-wal").exists() == killed
    spool = Spool(root).create()
    assert spool.marker.is_file() and (root / "series" / "1.2" / "1.2.1.dcm").read_bytes() == b"x"


def test_the_quota_counts_instances_written_replaced_and_removed(tmp_path):
    from spleen_seg.node.spool import SpoolQuotaExceeded

    spool = Spool(tmp_path / "spool").create()
    spool.write_instance("1.2", "1.2.1", b"a" * 600, quota_bytes=1000)
    with pytest.raises(SpoolQuotaExceeded, match="spool quota reached: 600 bytes of received instances held, quota "
                                                 "1.0 kB"):
        spool.write_instance("1.2", "1.2.2", b"b" * 500, quota_bytes=1000)
    assert sorted(p.name for p in spool.series_folder("1.2").iterdir()) == ["1.2.1.dcm"]  # nothing written
    spool.write_instance("1.2", "1.2.1", b"a" * 300, quota_bytes=1000)  # a resend replaces: 300, not 900
    assert spool.instance_bytes() == 300 == Spool(spool.root).instance_bytes()  # a fresh count from the disk agrees
    spool.remove_instance("series/1.2/1.2.1.dcm")
    assert spool.instance_bytes() == 0
    spool.write_instance("1.3", "1.3.1", b"c" * 1000, quota_bytes=1000)
    spool.delete_retired(spool.retire_series("1.3"), [])
    assert spool.instance_bytes() == 0 and list(spool.purging.iterdir()) == []
    # After a kill: remove_strays counts what it keeps on its own walk of the spool
    kept = spool.write_instance("1.4", "1.4.1", b"d" * 700)
    spool.write_instance("1.4", "1.4.2", b"e" * 200)  # written, never recorded
    restarted = Spool(spool.root)
    assert restarted.remove_strays({kept}) == 1
    assert restarted._instance_bytes == 700 == restarted.instance_bytes()
