"""SIGKILL the node at the points that matter; restart: nothing acknowledged is lost, each SEG arrives once.

One spool, four node processes in turn, storescp as the destination:

1. series 1 fully sent and acknowledged, node killed before it completes (receiving);
2. restarted with the destination down: series 1 is processed and waits to be sent; series 2
   is being transferred; node killed mid-transfer (series 1 sending, series 2 receiving);
3. destination up, restarted: series 1's SEG is sent; series 2 is sent again in full (what
   was acknowledged before the kill comes back as duplicates); node killed while segmenting it;
4. restarted: series 2's SEG is sent; series 1 resent in full yields no second SEG.

The node's log of all four runs is printed (pytest -s shows it; the closing note quotes it).
"""

from __future__ import annotations

import pydicom
from node_harness import (
    Node,
    Storescp,
    free_port,
    need_binaries,
    phantom_series,
    start_storescu,
    storescu,
    wait_until,
    warm_model_cache,
)
from pydicom.uid import SegmentationStorage

QUIET_SECONDS = 2.0
RESULT_TIMEOUT_S = 120.0
STATE_TIMEOUT_S = 90.0
# Mid-transfer: kill once this many instances of series 2 are acknowledged.
KILL_AFTER_INSTANCES = 10
SERIES_INSTANCES = 32  # node_harness.PHANTOM_SHAPE


def job(node: Node, series_uid: str, index: int = -1) -> dict | None:
    jobs = [j for j in node.jobs() if j["series_key"] == series_uid]
    return jobs[index] if jobs else None


def segs(receiver: Storescp, series_uid: str) -> list[pydicom.Dataset]:
    return [ds for ds in receiver.received(SegmentationStorage)
            if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid]


def note(node: Node, what: str) -> None:
    """A line of the test's own in the node's log, which the report quotes."""
    with open(node.log, "a") as log:
        log.write(f"----- test: {what} -----\n")


def kill(node: Node, what: str) -> None:
    """SIGKILL the node and say so in its log (a killed process writes nothing more)."""
    node.kill()
    note(node, what)


def test_sigkill_at_each_stage_loses_nothing_and_sends_each_seg_once(tmp_path):
    need_binaries("storescu", "storescp", "echoscu")
    warm_model_cache()
    spool, log, port, receiver_port = tmp_path / "spool", tmp_path / "node.log", free_port(), free_port()
    flags = ("--quiet-seconds", str(QUIET_SECONDS), "--destination", f"RECEIVER@127.0.0.1:{receiver_port}")
    series1, series2 = phantom_series(tmp_path / "s1", seed=1), phantom_series(tmp_path / "s2", seed=2)
    uid1, uid2 = (str(pydicom.dcmread(s[0]).SeriesInstanceUID) for s in (series1, series2))
    receiver = None
    try:
        # 1. Transfer done and acknowledged; killed before the quiet period ends.
        node = Node(spool, port, log, *flags)
        assert storescu(port, series1).returncode == 0
        first = job(node, uid1)
        assert first["state"] in ("receiving", "complete") and first["instances"] == SERIES_INSTANCES
        kill(node, "SIGKILL 1: series 1 received and acknowledged, not yet complete")

        # 2. Destination down: series 1 processed, its SEG waits; killed in the middle of series 2's transfer.
        node = Node(spool, port, log, *flags)
        wait_until(lambda: (j := job(node, uid1)) and j["state"] == "sending" and j["results"][0]["attempts"] >= 1,
                   STATE_TIMEOUT_S, "series 1 to wait for the destination")
        transfer = start_storescu(port, series2, tmp_path / "storescu2.log", nagle=True)
        wait_until(lambda: (j := job(node, uid2)) and j["instances"] >= KILL_AFTER_INSTANCES, STATE_TIMEOUT_S,
                   "part of series 2 to arrive")
        kill(node, "SIGKILL 2: series 1 waiting to be sent (destination down), series 2 in mid-transfer")
        assert transfer.stop() != 0  # the sender saw the association die
        acknowledged = job(node, uid2)["instances"]
        assert KILL_AFTER_INSTANCES <= acknowledged < SERIES_INSTANCES
        note(node, f"series 2: {acknowledged} of {SERIES_INSTANCES} instances acknowledged before the kill")

        # 3. Destination back: series 1's SEG goes out; series 2 resent in full, killed while segmenting.
        receiver = Storescp(tmp_path / "received", receiver_port, tmp_path / "storescp.log")
        node = Node(spool, port, log, *flags)
        wait_until(lambda: segs(receiver, uid1), RESULT_TIMEOUT_S, "series 1's SEG")
        resent = storescu(port, series2)
        assert resent.returncode == 0, resent.stderr
        wait_until(lambda: (j := job(node, uid2)) and j["state"] == "segmenting", STATE_TIMEOUT_S,
                   "series 2 to be segmenting")
        kill(node, "SIGKILL 3: series 2 segmenting (destination up, series 1 sent)")

        # 4. Restart: series 2 processed again and sent; series 1 resent: duplicates only.
        node = Node(spool, port, log, *flags)
        wait_until(lambda: segs(receiver, uid2), RESULT_TIMEOUT_S, "series 2's SEG")
        note(node, "series 1 sent again in full")
        assert storescu(port, series1).returncode == 0
        # A duplicate is recognised on receipt, before its C-STORE is answered: no job can follow.
        node.wait_for_log(f"stored=0 duplicates={SERIES_INSTANCES}", 10)
        final = wait_until(lambda: all(j["state"] == "done" for j in node.jobs()) and node.jobs(), STATE_TIMEOUT_S,
                           "every job done")
        node.stop()

        jobs = {j["series_key"]: j for j in final}
        assert len(final) == 2 and set(jobs) == {uid1, uid2}
        assert jobs[uid1]["instances"] == jobs[uid2]["instances"] == SERIES_INSTANCES
        assert jobs[uid2]["attempts"] == 2  # segmented twice: the kill interrupted the first
        (seg1,), (seg2,) = segs(receiver, uid1), segs(receiver, uid2)
        for seg, files in ((seg1, series1), (seg2, series2)):
            sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
            assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
                == sources
        assert len(receiver.received()) == 2  # nothing else was sent
        text = log.read_text()
        assert text.count("event=node state=recovered") == 4
        assert "stray_files_removed=" in text and "recovered=True" in text
    finally:
        print(f"\n----- node log of the kill-and-restart test ({log}) -----\n{log.read_text() if log.exists() else ''}")
        if receiver is not None:
            receiver.stop()
