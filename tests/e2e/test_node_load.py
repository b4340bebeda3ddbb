"""Load: 8 series over 4 concurrent associations, then late instances for one of them.

Every series comes back as a SEG referencing exactly the instances sent, no instance is lost,
the late instances make their series processed again (a second SEG, a new series UID, over
all its instances), and the node's peak resident memory is reported.
"""

from __future__ import annotations

import datetime as dt
import re

import pydicom
from node_harness import (
    Node,
    Storescp,
    free_port,
    need_binaries,
    phantom_series,
    referenced_instances,
    start_storescu,
    storescu,
    wait_until,
    warm_model_cache,
)
from pydicom.uid import SegmentationStorage

SERIES = 8
ASSOCIATIONS = 4
SHAPE = (48, 48, 24)  # 24 slices a series: the load is in the transfers and the queue
LATE_INSTANCES = 4
QUIET_SECONDS = 1.5
RESULT_TIMEOUT_S = 180.0
# Generous: the node holds one series, the network runtime and the libraries.
MAX_PEAK_RSS_BYTES = 3 * 1024**3
ASSOCIATION_LINE = re.compile(r"^(\S+ \S+) level=INFO event=association result=released calling_ae=STORESCU .*"
                              r"stored=(\d+) .* seconds=([\d.]+)$")


def concurrent_associations(log: str) -> int:
    """The most storescu associations open at once, from the node's association lines (end time, duration)."""
    spans = []
    for line in log.splitlines():
        match = ASSOCIATION_LINE.match(line)
        if match:
            end = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            spans.append((end - float(match.group(3)), end))
    return max(sum(start <= t < end for start, end in spans) for t, _ in spans)


def test_eight_series_over_four_associations_with_late_instances(tmp_path):
    need_binaries("storescu", "storescp", "echoscu")
    warm_model_cache()
    receiver = Storescp(tmp_path / "received", free_port(), tmp_path / "storescp.log")
    node = Node(tmp_path / "spool", free_port(), tmp_path / "node.log", "--quiet-seconds", str(QUIET_SECONDS),
                "--max-associations", str(ASSOCIATIONS), "--destination", receiver.destination)
    try:
        series = [phantom_series(tmp_path / f"s{i}", seed=i + 1, shape=SHAPE) for i in range(SERIES)]
        uids = [str(pydicom.dcmread(files[0]).SeriesInstanceUID) for files in series]
        instances = [{str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files} for files in series]
        early, late = series[0][:-LATE_INSTANCES], series[0][-LATE_INSTANCES:]
        batches = [early + series[4], series[1] + series[5], series[2] + series[6], series[3] + series[7]]
        # dcmtk's default Nagle timing (~40 ms an instance) keeps the four transfers overlapping.
        senders = [start_storescu(node.port, files, tmp_path / f"storescu{i}.log", nagle=True)
                   for i, files in enumerate(batches)]
        assert [sender.popen.wait(timeout=RESULT_TIMEOUT_S) for sender in senders] == [0] * ASSOCIATIONS

        def segs(uid: str) -> list[pydicom.Dataset]:
            return [ds for ds in receiver.received(SegmentationStorage)
                    if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid]

        wait_until(lambda: all(segs(uid) for uid in uids), RESULT_TIMEOUT_S, "a SEG for each of the 8 series")
        (first,) = segs(uids[0])
        late_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in late}
        assert referenced_instances(first) == instances[0] - late_uids
        assert storescu(node.port, late).returncode == 0
        wait_until(lambda: len(segs(uids[0])) == 2, RESULT_TIMEOUT_S, "the second SEG of the series with late instances")
        jobs = wait_until(lambda: all(j["state"] == "done" for j in node.jobs()) and node.jobs(), RESULT_TIMEOUT_S,
                          "every job done")
        peak_rss = node.peak_rss_bytes()
    finally:
        node.stop()
        receiver.stop()

    log = node.log.read_text()
    print(f"\nnode peak RSS under load: {peak_rss / 1024**2:.0f} MiB "
          f"({concurrent_associations(log)} concurrent associations, {len(jobs)} jobs)")
    assert concurrent_associations(log) == ASSOCIATIONS
    assert sum(j["instances"] for j in jobs) == SERIES * SHAPE[2]  # no instance lost, none counted twice
    assert len(jobs) == SERIES + 1 and all(j["attempts"] == 1 for j in jobs)
    received = receiver.received(SegmentationStorage)
    by_series = {uid: [ds for ds in received if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid] for uid in uids}
    for uid, expected in zip(uids[1:], instances[1:], strict=True):
        (seg,) = by_series[uid]
        assert referenced_instances(seg) == expected and seg.StudyInstanceUID == "1.2.3.4"
    # The series with late instances: first over the early instances, then over all, as a new SEG series.
    early_seg, full_seg = sorted(by_series[uids[0]], key=lambda ds: len(referenced_instances(ds)))
    assert referenced_instances(early_seg) == instances[0] - late_uids
    assert referenced_instances(full_seg) == instances[0]
    assert early_seg.SeriesInstanceUID != full_seg.SeriesInstanceUID
    assert peak_rss < MAX_PEAK_RSS_BYTES
