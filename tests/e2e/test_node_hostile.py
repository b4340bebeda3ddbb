"""The node as a subprocess facing hostile peers over real sockets: a PDU declaring 4 GiB before
any AE title (RSS measured, bounded), a flood of idle and stalled TCP connections (connection
limit, idle timeout), a silent TLS connection while another peer echoes, and a --spool folder
of someone else's (refused, byte for byte untouched)."""

from __future__ import annotations

import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from node_harness import (
    Node,
    Process,
    echoscu,
    free_port,
    make_tls_files,
    need_binaries,
    snapshot,
    tls_echo,
    warm_model_cache,
)

from spleen_seg.pipeline.network import demo_weights_path

MIB = 1024**2
MODEL_LOADED = "event=node state=model_loaded"
MODEL_LOAD_TIMEOUT_S = 120.0
# The attack: two connections whose A-ASSOCIATE-RQ header declares 4 GiB, then zeros.
FLOOD_CONNECTIONS = 2
FLOOD_BYTES = 192 * MIB  # per connection, if the node keeps reading
FLOOD_CHUNK = MIB
FLOOD_SECONDS = 20.0
# What a dropped peer may still push into the kernel's socket buffers before its writes fail.
MAX_BYTES_BEFORE_DROP = 32 * MIB
MAX_RSS_GROWTH = 32 * MIB
SOCKET_TIMEOUT_S = 10.0
ECHO_WITHIN_S = 5.0
IDLE_TIMEOUT_S = 1.0
CLOSED_AT_ACCEPT_WITHIN_S = 0.5
CLOSED_AFTER_IDLE_WITHIN_S = IDLE_TIMEOUT_S + 1.5
REFUSED_START_WITHIN_S = 60.0


def flood(port: int, sent: list[int], ready: threading.Barrier, done: threading.Event) -> None:
    """Declare a 4 GiB A-ASSOCIATE-RQ, stream zeros until the node closes or FLOOD_BYTES went; stay
    connected until ``done`` (the node's memory is measured while the connection is open)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
        zeros, count, deadline = bytes(FLOOD_CHUNK), 0, time.monotonic() + FLOOD_SECONDS
        try:
            while count < FLOOD_BYTES and time.monotonic() < deadline:
                sock.sendall(zeros)
                count += len(zeros)
        except OSError:  # reset or broken pipe: the node dropped us
            pass
        sent.append(count)
        ready.wait(SOCKET_TIMEOUT_S + FLOOD_SECONDS)
        done.wait(SOCKET_TIMEOUT_S)


def test_a_4gib_pdu_before_any_ae_title_is_dropped_and_memory_stays_flat(tmp_path):
    need_binaries("echoscu")
    warm_model_cache()
    node = Node(tmp_path / "spool", free_port(), tmp_path / "node.log")
    try:
        node.wait_for_log(MODEL_LOADED, MODEL_LOAD_TIMEOUT_S)
        rss_before, peak_before = node.rss_bytes(), node.peak_rss_bytes()
        sent: list[int] = []
        ready, done = threading.Barrier(FLOOD_CONNECTIONS + 1), threading.Event()
        peers = [threading.Thread(target=flood, args=(node.port, sent, ready, done)) for _ in range(FLOOD_CONNECTIONS)]
        for peer in peers:
            peer.start()
        ready.wait(SOCKET_TIMEOUT_S + FLOOD_SECONDS)
        rss_during, peak_during = node.rss_bytes(), node.peak_rss_bytes()
        done.set()
        for peer in peers:
            peer.join(SOCKET_TIMEOUT_S)
        figures = (f"RSS {rss_before / MIB:.0f} -> {rss_during / MIB:.0f} MiB, peak {peak_before / MIB:.0f} -> "
                   f"{peak_during / MIB:.0f} MiB, sent {[s // MIB for s in sent]} MiB")
        print(figures)
        assert max(sent) < MAX_BYTES_BEFORE_DROP, f"the node kept reading: {figures}"
        assert rss_during - rss_before < MAX_RSS_GROWTH and peak_during - peak_before < MAX_RSS_GROWTH, figures
        node.wait_for_log("declared a 4294967295-byte A-ASSOCIATE-RQ PDU", SOCKET_TIMEOUT_S)
        assert node.new_log().count("event=connection result=dropped address=127.0.0.1") == FLOOD_CONNECTIONS
        assert echoscu(node.port).returncode == 0  # and the node serves on
    finally:
        node.stop()


def close_times(sockets: list[socket.socket], started: float, timeout: float) -> list[float | None]:
    """For each socket, the seconds from ``started`` until the node closed it (EOF or reset), None if it
    was still open ``timeout`` seconds after ``started``; all are watched at once."""
    times: list[float | None] = [None] * len(sockets)
    with selectors.DefaultSelector() as watch:
        for index, sock in enumerate(sockets):
            watch.register(sock, selectors.EVENT_READ, index)
        while watch.get_map():
            left = started + timeout - time.monotonic()
            events = watch.select(max(left, 0)) if left > 0 else []
            if not events:
                break
            for key, _ in events:
                try:
                    data = key.fileobj.recv(1)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"the node sent {data!r}"
                times[key.data] = time.monotonic() - started
                watch.unregister(key.fileobj)
    return times


def test_idle_and_stalled_connections_are_limited_and_timed_out(tmp_path):
    need_binaries("echoscu")
    warm_model_cache()
    node = Node(tmp_path / "spool", free_port(), tmp_path / "node.log", "--max-associations", "2",
                "--max-connections", "4", "--idle-timeout", f"{IDLE_TIMEOUT_S:g}")
    try:
        node.wait_for_log(MODEL_LOADED, MODEL_LOAD_TIMEOUT_S)  # the model's load holds the GIL for long stretches
        started = time.monotonic()
        stalled = socket.create_connection(("127.0.0.1", node.port), timeout=SOCKET_TIMEOUT_S)
        stalled.sendall(b"\x01\x00\x00")  # half a PDU header, then nothing: a read that would block forever
        silent = [socket.create_connection(("127.0.0.1", node.port), timeout=SOCKET_TIMEOUT_S) for _ in range(9)]
        connections = [stalled, *silent]
        at_accept = close_times(connections, started, CLOSED_AT_ACCEPT_WITHIN_S)
        held = [sock for sock, closed in zip(connections, at_accept, strict=True) if closed is None]
        assert len(held) == 4 and stalled in held, f"4 connections may be open, the others closed at accept: {at_accept}"
        assert echoscu(node.port).returncode != 0  # no room while 4 are held
        after_idle = close_times(held, started, CLOSED_AFTER_IDLE_WITHIN_S)
        print(f"closed at accept: {sum(t is not None for t in at_accept)} of {len(connections)}; the 4 held closed "
              f"{[round(t, 2) if t else t for t in after_idle]} s after connecting (idle timeout {IDLE_TIMEOUT_S:g} s)")
        assert None not in after_idle, f"still open {CLOSED_AFTER_IDLE_WITHIN_S} s after connecting: {after_idle}"
        for sock in connections:
            sock.close()
        log = node.new_log()
        assert log.count('reason="4 connections already open (--max-connections)"') >= 6
        assert "no complete association request within 1 s of connecting" in log  # the stalled one
        assert echoscu(node.port).returncode == 0  # room again
    finally:
        node.stop()


def test_a_silent_tls_connection_does_not_stop_another_peer_from_echoing(tmp_path):
    warm_model_cache()
    cert, key = make_tls_files(tmp_path / "tls")
    node = Node(tmp_path / "spool", free_port(), tmp_path / "node.log", "--tls-cert", str(cert), "--tls-key", str(key),
                "--tls-ca", str(cert))
    try:
        node.wait_for_log(MODEL_LOADED, MODEL_LOAD_TIMEOUT_S)
        with socket.create_connection(("127.0.0.1", node.port), timeout=SOCKET_TIMEOUT_S):
            status, seconds = tls_echo(node.port, cert, key, ECHO_WITHIN_S)
            print(f"TLS echo beside a silent connection: status {status} in {seconds:.2f} s")
            assert status == 0 and seconds < ECHO_WITHIN_S
    finally:
        node.stop()


def test_serve_on_a_folder_that_is_no_spool_refuses_in_one_line_and_touches_nothing(tmp_path):
    folder = tmp_path / "data"
    (folder / "results").mkdir(parents=True)
    (folder / "series" / "1.2").mkdir(parents=True)
    (folder / "results" / "thesis.docx").write_bytes(b"a year of work")
    (folder / "series" / "1.2" / "3.dcm").write_bytes(b"DICM someone's instance")
    (folder / "incoming").mkdir()
    (folder / "incoming" / "x.part").write_bytes(b"theirs too")
    for path in (folder, folder / "results", folder / "series"):
        os.chmod(path, 0o755)
    before = snapshot(folder)
    serve = Process([sys.executable, "-m", "spleen_seg.cli", "serve", "--spool", str(folder), "--host", "127.0.0.1",
                     "--port", str(free_port()), "--weights", str(demo_weights_path())], tmp_path / "serve.log")
    try:
        code = serve.popen.wait(timeout=REFUSED_START_WITHIN_S)
    except subprocess.TimeoutExpired:
        serve.stop()
        pytest.fail(f"the node started on someone else's folder:\n{serve.text()[-2000:]}")
    after = snapshot(folder)
    left = sorted(set(before) & set(after))
    print(f"exit {code}; paths before {len(before)}, after {len(after)}, unchanged {sum(before[k] == after[k] for k in left)}")
    assert code == 2
    (line,) = [line for line in serve.text().splitlines() if line.strip()]
    assert line.startswith(f"error: --spool {folder} is not a spleen-seg spool")
    assert after == before
