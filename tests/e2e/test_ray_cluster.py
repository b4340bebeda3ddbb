"""``spleen-seg segment --ray ADDRESS`` on a real two-node Ray cluster on this machine (issue 9).

The module starts a head and a second node with ``ray start --block`` (as a user would, on
127.0.0.1, free port, small object stores, no dashboard) and stops both by process id at
the end. One inference actor is killed with SIGKILL mid-run: the job must finish with the
plain CLI's masks. A bad file fails its case alone; a rerun skips the finished cases.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ci import import_or_skip
from phantoms import save_nifti

from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.training.evaluate import dice
from spleen_seg.training.phantom import make_phantom

import_or_skip("ray", reason='the Ray extra is not installed (pip install "spleen-seg[ray]")')

CLI = [sys.executable, "-m", "spleen_seg.cli"]
REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
SEEDS = range(1, 9)
# 144 x 144 x 96 mm: one 96^3 window on the 1.5 x 1.5 x 2 mm grid, so a case costs one network
# call; the phantom scales its anatomy to the field of view (spleen of 7,000-15,000 voxels).
TINY_SHAPE, TINY_SPACING_MM = (64, 64, 32), (2.25, 2.25, 3.0)
MIN_DICE = 0.9
EXIT_FAILED = 2
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30
POLL_S = 0.1
OBJECT_STORE_BYTES = 100_000_000
ACTOR_LINE = re.compile(r"inference actor 0: pid (\d+)")
RETRY_LINE = re.compile(r"(\S+): inference actor 0 died or is unreachable \((\w+)\); retrying on actor 1")
# Ray >= 2.59 starts a head with token authentication; the other node and the driver must
# use it too (RAY_AUTH_MODE=token) with the same token: one per test session, never the
# user's ~/.ray/auth_token.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@dataclass(frozen=True)
class Cluster:
    address: str
    processes: tuple[subprocess.Popen, ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(POLL_S)


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group; ready once it says it blocks."""
    with log.open("w") as out:
        proc = subprocess.Popen([str(RAY), "start", *args, "--node-ip-address", "127.0.0.1",
                                 "--object-store-memory", str(OBJECT_STORE_BYTES), "--block"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV},
                                start_new_session=True)
    wait_for(lambda: "block forever" in log.read_text() or proc.poll() is not None, START_TIMEOUT_S,
             f"ray start {args[0]} was not ready")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (``ray start --block`` then stops its raylet and GCS); SIGKILL to its group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short temp folder: Ray's socket paths under it must stay below the 107-byte limit.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    processes: list[subprocess.Popen] = []
    try:
        processes.append(start_node(["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                                     "--temp-dir", str(temp)], temp / "head.log"))
        processes.append(start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "2"], temp / "node.log"))
        yield Cluster(address=f"127.0.0.1:{port}", processes=tuple(processes))
    finally:
        for proc in reversed(processes):
            stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def phantoms(folder: Path, seeds) -> list[Path]:
    """Tiny phantoms ``case<seed>.nii.gz``, and their true spleens as ``truth<seed>.nii.gz``."""
    paths = []
    for seed in seeds:
        case = make_phantom(seed, shape=TINY_SHAPE, spacing_mm=TINY_SPACING_MM, orientation="RAS" if seed % 2 else "LPS")
        paths.append(save_nifti(case.image_hu.astype(np.int16), case.affine, folder / f"case{seed}.nii.gz"))
        save_nifti(case.spleen_mask.astype(np.uint8), case.affine, folder / f"truth{seed}.nii.gz")
    return paths


def segment(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return [*CLI, "segment", *map(str, inputs), "-o", str(out), "--weights", str(demo_weights_path()), *extra]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, **RAY_ENV})


def summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def mask(out: Path, case: str) -> np.ndarray:
    return np.asarray(nib.load(str(out / case / "spleen.nii.gz")).dataobj)


def test_a_killed_inference_actor_has_its_case_retried_and_the_masks_equal_the_plain_run(cluster, tmp_path):
    inputs = phantoms(tmp_path / "in", SEEDS)
    plain = run(segment(inputs, tmp_path / "plain", "-q"))
    assert plain.returncode == 0, plain.stderr[-3000:]

    out, log = tmp_path / "ray", tmp_path / "ray.log"
    with log.open("w") as err:
        proc = subprocess.Popen(segment(inputs, out, "--ray", cluster.address), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=err, text=True, env={**os.environ, **RAY_ENV})
    try:
        wait_for(lambda: ACTOR_LINE.search(log.read_text()) or proc.poll() is not None, START_TIMEOUT_S,
                 "no inference actor started")
        victim = int(ACTOR_LINE.search(log.read_text()).group(1))
        first = proc.stdout.readline()  # the first finished case: the job is under way
        assert f"-> {out}" in first, first + log.read_text()[-3000:]
        os.kill(victim, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = log.read_text()
    print(f"killed inference actor 0 (pid {victim}) after: {first.strip()}\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    retried = RETRY_LINE.findall(stderr)
    assert retried, f"no case was retried on the other actor:\n{stderr[-3000:]}"
    rows = summary(out)
    assert sorted(rows) == [f"case{seed}" for seed in SEEDS]
    assert {row["status"] for row in rows.values()} == {"ok"}
    for seed in SEEDS:
        case = f"case{seed}"
        np.testing.assert_array_equal(mask(out, case), mask(tmp_path / "plain", case), err_msg=case)
        truth = np.asarray(nib.load(str(tmp_path / "in" / f"truth{seed}.nii.gz")).dataobj)
        assert dice(mask(out, case), truth) > MIN_DICE, case  # real masks, not two empty ones
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no work folder left behind


def test_a_bad_file_fails_alone_and_a_rerun_skips_the_finished_cases(cluster, tmp_path):
    inputs = phantoms(tmp_path / "in", (3, 4))
    bad = tmp_path / "in" / "bad.nii.gz"
    bad.write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    first = run(segment([*inputs, bad], out, "--ray", cluster.address))
    assert first.returncode == EXIT_FAILED, first.stderr[-3000:]
    rows = summary(out)
    assert {case: row["status"] for case, row in rows.items()} == {"case3": "ok", "case4": "ok", "bad": "failed"}
    assert rows["bad"]["error"].startswith(f"{bad}: ") and not (out / "bad").exists()
    assert "3 cases in" in first.stderr and "2 finished" in first.stderr and "1 failed" in first.stderr
    reports = {case: (out / case / "report.json").stat().st_mtime_ns for case in ("case3", "case4")}

    second = run(segment([*inputs, bad], out, "--ray", cluster.address))
    assert second.returncode == EXIT_FAILED, second.stderr[-3000:]
    assert sorted(re.findall(r"skipped, already done: (\S+)", second.stdout)) == ["case3", "case4"]
    assert {case: (out / case / "report.json").stat().st_mtime_ns for case in reports} == reports
    rows = summary(out)
    assert [rows[case]["reused"] for case in ("case3", "case4", "bad")] == ["yes", "yes", "no"]
    assert rows["bad"]["status"] == "failed" and "2 skipped" in second.stderr
