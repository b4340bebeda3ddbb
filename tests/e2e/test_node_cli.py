"""The node's commands as a user meets them: one-line errors for a taken port, a bad flag, a
second node on one spool, a folder that is no spool; the status of a spool."""

from __future__ import annotations

import socket
import subprocess
import sys

from node_harness import REPO, Node, free_port, jobs_of, warm_model_cache

from spleen_seg.pipeline.network import demo_weights_path

TIMEOUT_S = 120


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spleen_seg.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def serve(spool, port: int, *flags: str) -> subprocess.CompletedProcess:
    return cli("serve", "--spool", str(spool), "--host", "127.0.0.1", "--port", str(port),
               "--weights", str(demo_weights_path()), *flags)


def test_port_in_use_is_one_line_and_exit_status_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = serve(tmp_path / "spool", taken.getsockname()[1])
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "is already in use" in line and "pass another --port" in line


def test_bad_destination_is_a_flag_error_before_anything_starts(tmp_path):
    result = serve(tmp_path / "spool", free_port(), "--destination", "pacs.example.org:104")
    assert result.returncode == 2 and "not AE@HOST:PORT" in result.stderr
    assert not (tmp_path / "spool").exists()


def test_second_node_on_a_spool_is_refused_and_status_shows_the_running_one(tmp_path):
    warm_model_cache()
    node = Node(tmp_path / "spool", free_port(), tmp_path / "node.log", "--quiet-seconds", "1")
    try:
        second = serve(tmp_path / "spool", free_port())
        assert second.returncode == 2 and f"in use by a running node (pid {node.pid})" in second.stderr
        status = cli("status", "--spool", str(tmp_path / "spool"))
        assert status.returncode == 0
        assert status.stdout.splitlines()[0] == f"spool {tmp_path / 'spool'}: node running (pid {node.pid}); no jobs yet"
        assert jobs_of(tmp_path / "spool") == []
    finally:
        node.stop()
    assert (tmp_path / "spool" / "jobs.sqlite").stat().st_mode & 0o777 == 0o600


def test_status_of_a_folder_that_is_no_spool(tmp_path):
    result = cli("status", "--spool", str(tmp_path))
    assert result.returncode == 2 and "no node spool here" in result.stderr
