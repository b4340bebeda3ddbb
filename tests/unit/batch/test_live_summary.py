"""batch.summary at cohort scale: the rewrite schedule, the per-case journal (a SIGKILL loses no
finished row), the parts' summaries merged into summary.csv, also when parts finish together."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import spleen_seg.batch.summary as summary_module
from spleen_seg.batch.inputs import Part
from spleen_seg.batch.summary import (
    SUMMARY_COLUMNS,
    LiveSummary,
    RewriteSchedule,
    SummaryRow,
    merge_summaries,
    part_summary_name,
    read_summary,
)
from spleen_seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
SHARE = 0.05
KILL_AFTER_ROWS = 7
WAIT_S = 60
RACE_ROUNDS = 4
RACE_PARTS = 4
RACE_ROWS = 30


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def row(case: str, status: str = "failed") -> SummaryRow:
    return SummaryRow(case=case, source=f"/data/{case}.nii.gz", status=status, error=f"/data/{case}.nii.gz: no")


def cases_in(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return [line["case"] for line in csv.DictReader(f)]


def test_schedule_rewrites_while_cheap_and_waits_once_costly():
    clock = Clock()
    schedule = RewriteSchedule(SHARE, clock)
    assert schedule.due()
    with schedule.timed():
        clock.now += 0.01  # a 10 ms rewrite: due again after 0.2 s, so after every case of a second
    clock.now += 0.2
    assert schedule.due()
    with schedule.timed():
        clock.now += 2.0  # a 2 s rewrite (100,000 rows): not before 40 s
    clock.now += 39.0
    assert not schedule.due()
    clock.now += 1.0
    assert schedule.due()


def test_costly_rewrites_are_deferred_and_the_journal_holds_the_rows(tmp_path, monkeypatch):
    """With a rewrite costing 1 s and a case 1 s, the summary is rewritten every 20 cases, not every case."""
    clock = Clock()
    writes = []
    real_write = summary_module.write_summary

    def costly_write(rows, dest):
        clock.now += 1.0
        writes.append(len(rows))
        return real_write(rows, dest)

    monkeypatch.setattr(summary_module, "write_summary", costly_write)
    live = LiveSummary(tmp_path / "summary.csv", total=100, clock=clock)
    live.write()  # the start (resume): nothing finished yet
    for index in range(50):
        clock.now += 1.0
        live.record(index, row(f"c{index:03d}"))
    # A rewrite may follow the last one after 1 s / 0.05 = 20 s: every 20 cases (5% of the time).
    assert writes == [0, 20, 40]
    on_disk = cases_in(tmp_path / "summary.csv")
    journal = [line["case"] for line in read_summary(tmp_path / "summary.journal.csv")]
    assert len(on_disk) == 40 and on_disk + journal == [f"c{index:03d}" for index in range(50)]
    for index in range(50, 100):
        live.record(index, row(f"c{index:03d}"))
    assert writes[-1] == 100 and cases_in(tmp_path / "summary.csv") == [f"c{index:03d}" for index in range(100)]
    assert not (tmp_path / "summary.journal.csv").exists()  # a run that ended leaves no journal
    assert (tmp_path / "index.html").is_file()


KILLED_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from spleen_seg.batch.summary import LiveSummary, SummaryRow

    # Rewrites cost far more than the share allows: after the first, only the journal grows.
    live = LiveSummary(Path(sys.argv[1]) / "summary.csv", total=1000, share=1e-9)
    live.write()
    for index in range(1000):
        live.record(index, SummaryRow(f"c{index:04d}", f"/data/{index}.nii.gz", "ok"))
        print(index, flush=True)  # acknowledged: record() returned
        if index + 1 == int(sys.argv[2]):
            sys.stdin.readline()  # the test kills the process here
""")


def test_sigkill_loses_no_acknowledged_row(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path), str(KILL_AFTER_ROWS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        acknowledged = [proc.stdout.readline().strip() for _ in range(KILL_AFTER_ROWS)]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    assert acknowledged == [str(index) for index in range(KILL_AFTER_ROWS)]
    expected = [f"c{index:04d}" for index in range(KILL_AFTER_ROWS)]
    assert cases_in(tmp_path / "summary.csv") == []  # written at the start only
    # A journal line cut short by the kill is dropped, not misread.
    with (tmp_path / "summary.journal.csv").open("a") as journal:
        journal.write("c9999,/data/9999.nii.gz,o")
    result = merge_summaries(tmp_path)
    assert [line["case"] for line in result.rows] == expected and result.count is None
    assert result.journal_rows == KILL_AFTER_ROWS
    assert cases_in(tmp_path / "summary.csv") == expected


def run_part(out: Path, part: Part, cases: list[str], *, final: bool = True) -> LiveSummary:
    live = LiveSummary(out / "summary.csv", part=part, total=len(cases) if final else None)
    live.write()
    for index, case in enumerate(cases):
        live.record(index, row(case, "ok"))
    if not final:
        live.write(final=True)  # Ctrl-C
    return live


def test_parts_merge_into_one_summary_in_case_order(tmp_path):
    header = ",".join(SUMMARY_COLUMNS) + "\n"
    (tmp_path / "summary.journal.csv").write_text(header + "stale,plain-run,journal\n")
    (tmp_path / "summary.part-0-of-2.csv").write_text(header + "a,stale,split\n")
    cases = [f"case{n:02d}" for n in range(10)]
    for index in range(3):
        run_part(tmp_path, Part(index, 3), cases[index::3])
    assert cases_in(tmp_path / "summary.csv") == cases
    assert cases_in(tmp_path / part_summary_name(Part(1, 3))) == cases[1::3]
    marks = [json.loads((tmp_path / f"summary.part-{i}-of-3.done").read_text()) for i in range(3)]
    assert marks == [{"status": "finished", "rows": len(cases[i::3]), "cases": len(cases[i::3])} for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("summary")) == [
        "summary.csv", *(f"summary.part-{i}-of-3{kind}" for i in range(3) for kind in (".csv", ".done"))]
    html = (tmp_path / "index.html").read_text()
    assert all(f'"{case}"' in html for case in cases)


def test_parts_finishing_together_lose_no_rows(tmp_path, monkeypatch):
    """Part 0 reads the part summaries; part 1 finishes and merges; then part 0 renames its now
    stale merge. Part 0 sees that part 1's final summary changed meanwhile and merges again."""
    part1 = LiveSummary(tmp_path / "summary.csv", part=Part(1, 2), total=2)
    part1.write()
    part1.record(0, row("b1", "ok"))
    part1.write()
    part0 = LiveSummary(tmp_path / "summary.csv", part=Part(0, 2), total=1)
    part0.write()
    real_write = summary_module.write_summary_rows
    merges = []

    def part1_finishes_meanwhile(rows, dest):
        merges.append([line["case"] for line in rows])
        if len(merges) == 1:
            part1.record(1, row("b2", "ok"))  # its final summary, its .done mark, its own merge
            assert cases_in(dest) == ["a1", "b1", "b2"]
        return real_write(rows, dest)

    monkeypatch.setattr(summary_module, "write_summary_rows", part1_finishes_meanwhile)
    part0.record(0, row("a1", "ok"))
    # Part 0's stale read, part 1's merge, part 0's second merge.
    assert merges == [["a1", "b1"], ["a1", "b1", "b2"], ["a1", "b1", "b2"]]
    assert cases_in(tmp_path / "summary.csv") == ["a1", "b1", "b2"]


def _race_part(out: str, index: int, barrier) -> None:
    cases = [f"p{index}_{n:03d}" for n in range(RACE_ROWS)]
    live = LiveSummary(Path(out) / "summary.csv", part=Part(index, RACE_PARTS), total=RACE_ROWS, share=1.0)
    live.write()
    barrier.wait()
    for number, case in enumerate(cases):
        live.record(number, row(case, "ok"))


@pytest.mark.parametrize("round_", range(RACE_ROUNDS))
def test_parts_in_processes_racing_to_the_end_lose_no_rows(tmp_path, round_):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(RACE_PARTS)
    workers = [context.Process(target=_race_part, args=(str(tmp_path), index, barrier)) for index in range(RACE_PARTS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT_S)
    assert [worker.exitcode for worker in workers] == [0] * RACE_PARTS
    expected = sorted(f"p{index}_{n:03d}" for index in range(RACE_PARTS) for n in range(RACE_ROWS))
    assert cases_in(tmp_path / "summary.csv") == expected


def test_merge_summaries_after_an_array_with_killed_and_missing_parts(tmp_path):
    run_part(tmp_path, Part(0, 4), ["a1", "a2"])
    run_part(tmp_path, Part(1, 4), ["b1"], final=False)  # Ctrl-C / SIGTERM
    killed = LiveSummary(tmp_path / "summary.csv", part=Part(2, 4), total=5, share=1e-9)
    killed.write()
    killed.record(0, row("c1", "ok"))
    killed.record(1, row("c2", "ok"))  # in its journal only; the process "dies" here
    # Part 3 never started.
    result = merge_summaries(tmp_path)
    assert [line["case"] for line in result.rows] == ["a1", "a2", "b1", "c1", "c2"]
    assert (result.finished, result.interrupted, result.unfinished, result.missing) == ([0], [1], [2], [3])
    assert result.journal_rows == 2 and cases_in(tmp_path / "summary.csv") == ["a1", "a2", "b1", "c1", "c2"]
    assert list(SUMMARY_COLUMNS) == next(csv.reader((tmp_path / "summary.csv").open()))


def test_merge_summaries_refuses_two_splits_and_an_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no summary.csv or part summaries"):
        merge_summaries(tmp_path)
    run_part(tmp_path, Part(0, 2), ["a"])
    (tmp_path / "summary.part-0-of-3.csv").write_text(",".join(SUMMARY_COLUMNS) + "\n")
    with pytest.raises(ConfigError, match="part summaries of 2 and 3 parts"):
        merge_summaries(tmp_path)


def test_a_run_without_parts_removes_the_part_summaries_of_an_earlier_array(tmp_path):
    run_part(tmp_path, Part(0, 2), ["a"])
    live = LiveSummary(tmp_path / "summary.csv", total=1)
    live.record(0, row("a", "ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "summary.csv"]
