"""Real components for the node's end-to-end tests and benchmark: the node as a subprocess,
dcmtk's echoscu/storescu/storescp, Orthanc with a temporary configuration.

Everything binds 127.0.0.1 on a free port, every wait is bounded, and every process is
stopped by its PID. Missing binaries skip a test with the reason, except under CI=true
where they fail it (CI installs them, see .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from ci import in_ci
from pydicom.uid import generate_uid
from synthetic_dicom import write_series

from spleen_seg.node.bookkeeper import open_for_status, status_records
from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.training.phantom import make_phantom

REPO = Path(__file__).resolve().parents[2]
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
NODE_AE = "SPLEENSEG"
NODE_DOCS = REPO / "docs" / "node.md"
ORTHANC_EXAMPLE_SECTION = "## Example: Orthanc as the PACS"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 60.0
POLL_S = 0.05
# storescp writes a received file in place: one younger than this may still be growing.
STORESCP_SETTLE_S = 0.5
# dcmtk waits for delayed TCP acknowledgements between PDUs unless Nagle is off (40 ms per
# instance on loopback); PACS products set this themselves.
DCMTK_ENV = {"TCP_NODELAY": "1"}
# Small phantom series (2.5 x 2.5 x 4 mm voxels): about a second to segment on 2 CPU cores.
PHANTOM_SHAPE = (64, 64, 32)
PHANTOM_SPACING_MM = (2.5, 2.5, 4.0)


def warm_model_cache() -> None:
    """Export the demo weights for the CPU backend once, before any node starts.

    Every node process reads the same session cache (SPLEEN_SEG_CACHE); exporting here
    keeps a node killed by a test from dying in the middle of the first export.
    """
    from spleen_seg.pipeline.backends import cached_export, resolve_backend

    backend = resolve_backend("auto", "cpu")
    if backend != "torch":
        cached_export(demo_weights_path(), backend)


def need_binaries(*names: str) -> None:
    """Skip (fail under CI=true) when a binary the test starts is not installed."""
    missing = [name for name in names if shutil.which(name) is None and not Path(name).is_file()]
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} (Debian packages dcmtk, orthanc, orthanc-dicomweb; see .ci/run)"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


class Process:
    """A started subprocess with its output in a log file; stopped by PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self.args = args
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                          env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.alive():
            os.kill(self.pid, sig)
        try:
            return self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            return self.popen.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind in the process."""
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=STOP_TIMEOUT_S)


class Node(Process):
    """``spleen-seg serve`` in a subprocess (demo weights unless given), listening on 127.0.0.1."""

    def __init__(self, spool: Path, port: int, log: Path, *flags: str, weights: Path | None = None):
        self.spool, self.port = spool, port
        start = log.stat().st_size if log.exists() else 0
        args = [sys.executable, "-m", "spleen_seg.cli", "serve", "--spool", str(spool), "--host", "127.0.0.1",
                "--port", str(port), "--weights", str(weights or demo_weights_path()), *flags]
        super().__init__(args, log)
        self._log_start = start
        self.wait_for_log("event=node state=listening", START_TIMEOUT_S)

    def new_log(self) -> str:
        """This run's lines (the log file is shared by restarts)."""
        with open(self.log, "rb") as handle:
            handle.seek(self._log_start)
            return handle.read().decode(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            if not self.alive():
                raise AssertionError(f"node exited ({self.popen.returncode}):\n{self.new_log()[-4000:]}")
            return text in self.new_log()
        wait_until(seen, timeout, f"'{text}' in the node's log {self.log}")

    def jobs(self) -> list[dict[str, Any]]:
        return jobs_of(self.spool)

    def peak_rss_bytes(self) -> int:
        """The process's peak resident set (VmHWM), read before it ends."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def rss_bytes(self) -> int:
        """The process's resident set now (psutil)."""
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)


def make_tls_files(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM), made by openssl; it also serves as
    the CA (``--tls-ca``) and as the client's certificate."""
    need_binaries("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True, timeout=COMMAND_TIMEOUT_S)
    return cert, key


def tls_echo(port: int, cert: Path, key: Path, timeout_s: float, called: str = NODE_AE):
    """A C-ECHO over TLS with a client certificate (pynetdicom); returns (status or None, seconds taken)."""
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    context.load_cert_chain(str(cert), str(key))
    ae = AE(ae_title="TLSECHO")
    # connection_timeout bounds the TCP connect and the TLS handshake (pynetdicom's default: none).
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(context, "127.0.0.1"))
    status = None
    if assoc.is_established:
        status = int(assoc.send_c_echo().Status)
        assoc.release()
    return status, time.monotonic() - started


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None, int]]:
    """Every path under ``root`` (itself included): mode, content (files), modification time in ns."""
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in paths}


def jobs_of(spool: Path) -> list[dict[str, Any]]:
    """The job table as ``spleen-seg status --json`` gives it, oldest job first."""
    table = open_for_status(spool)
    try:
        return list(reversed(status_records(table)))
    finally:
        table.close()


def echoscu(port: int, calling: str = "ECHOSCU", called: str = NODE_AE) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, env={**os.environ, **DCMTK_ENV})


def _storescu_args(port: int, files: list[Path], calling: str, called: str, options: tuple[str, ...]) -> list[str]:
    return ["storescu", "-aet", calling, "-aec", called, *options, "127.0.0.1", str(port), *map(str, files)]


def storescu(port: int, files: list[Path], calling: str = "STORESCU", called: str = NODE_AE,
             *options: str) -> subprocess.CompletedProcess:
    """Send ``files`` over one association."""
    return subprocess.run(_storescu_args(port, files, calling, called, options), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, env={**os.environ, **DCMTK_ENV})


def start_storescu(port: int, files: list[Path], log: Path, *, nagle: bool = False) -> Process:
    """storescu in the background; ``nagle`` keeps dcmtk's default (about 40 ms per instance on loopback)."""
    env = {"TCP_NODELAY": "0"} if nagle else DCMTK_ENV
    return Process(_storescu_args(port, files, "STORESCU", NODE_AE, ()), log, env=env)


class Storescp(Process):
    """dcmtk's storescp as the destination PACS: every received instance becomes a file in ``folder``."""

    def __init__(self, folder: Path, port: int, log: Path, ae_title: str = "RECEIVER"):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port, self.ae_title = folder, port, ae_title
        # name -> ((size, mtime), data set): a file whose size or time changed is read again.
        self._read: dict[str, tuple[tuple[int, int], pydicom.Dataset]] = {}
        super().__init__(["storescp", "-aet", ae_title, "-od", str(folder), str(port)], log, env=DCMTK_ENV)
        wait_until(lambda: echoscu(port, called=ae_title).returncode == 0, START_TIMEOUT_S, "storescp to listen")

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def received(self, sop_class_uid: str | None = None) -> list[pydicom.Dataset]:
        """What arrived so far. storescp writes each file in place: one modified within the last
        ``STORESCP_SETTLE_S`` is left for a later call (pydicom can parse a half-written file
        without an error, up to an element boundary: a SEG without its last sequence items)."""
        for path in self.folder.iterdir():
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            cached = self._read.get(path.name)
            if (cached is not None and cached[0] == key) or time.time() - stat.st_mtime < STORESCP_SETTLE_S:
                continue
            try:
                self._read[path.name] = (key, pydicom.dcmread(path))
            except (OSError, EOFError, ValueError, pydicom.errors.InvalidDicomError):
                continue
        return [ds for _, (_, ds) in sorted(self._read.items())
                if sop_class_uid is None or ds.SOPClassUID == sop_class_uid]


class Orthanc(Process):
    """Orthanc with a temporary configuration and storage; REST on ``http_port``, DICOM on ``dicom_port``."""

    def __init__(self, folder: Path, modalities: dict[str, list[Any]], *, dicomweb: bool = False,
                 ae_title: str = "ORTHANC"):
        folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port, self.ae_title = free_port(), free_port(), ae_title
        config = orthanc_config(folder / "storage", ae_title, self.dicom_port, self.http_port, modalities)
        if dicomweb:
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        super().__init__([ORTHANC, str(folder / "orthanc.json")], folder / "orthanc.log", env=DCMTK_ENV)
        wait_until(self._up, START_TIMEOUT_S, f"Orthanc's REST API on port {self.http_port}")

    def _up(self) -> bool:
        try:
            self.get("/system")
        except OSError:
            if not self.alive():
                raise AssertionError(f"Orthanc exited:\n{self.text()[-3000:]}") from None
            return False
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=COMMAND_TIMEOUT_S) as response:
            data = response.read()
        return json.loads(data) if response.headers.get_content_type() == "application/json" else data

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, payload: Any):
        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, files: list[Path]) -> str:
        """Upload instances by REST; returns the Orthanc id of their series."""
        series = {self.request("POST", "/instances", path.read_bytes(), "application/dicom")["ParentSeries"]
                  for path in files}
        assert len(series) == 1, series
        return series.pop()

    def find(self, modality: str, level: str = "Instance") -> list[str]:
        return self.post("/tools/find", {"Level": level, "Query": {"Modality": modality}})

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")


def orthanc_config(storage: Path, ae_title: str, dicom_port: int, http_port: int,
                   modalities: dict[str, list[Any]]) -> dict[str, Any]:
    """The node guide's Orthanc configuration (docs/node.md, "Example: Orthanc as the PACS"), with this
    test's folders, ports and modalities: the tests prove the documented configuration works as written."""
    guide = NODE_DOCS.read_text()
    section = guide[guide.index(ORTHANC_EXAMPLE_SECTION):]
    block = section[section.index("```json") + len("```json"):]
    config = json.loads(block[:block.index("```")])
    assert set(config["DicomModalities"]) == {"spleenseg"}, "the documented example declares the node as 'spleenseg'"
    config.update({"StorageDirectory": str(storage), "IndexDirectory": str(storage), "DicomAet": ae_title,
                   "DicomPort": dicom_port, "HttpPort": http_port, "DicomModalities": modalities})
    return config


def phantom_series(folder: Path, seed: int, *, shape: tuple[int, int, int] = PHANTOM_SHAPE,
                   study_uid: str = "1.2.3.4") -> list[Path]:
    """A synthetic CT series of a phantom (uncompressed Explicit VR LE), one file per slice, in slice order.

    The phantom's anatomy scales with ``shape`` (2.5 x 2.5 x 4 mm voxels): smaller shapes
    make smaller bodies that still hold a spleen, and take less time to segment.
    """
    case = make_phantom(seed, shape=shape, spacing_mm=PHANTOM_SPACING_MM, orientation="LPS")
    hu = case.image_hu.astype(np.float32)
    return write_series(folder, hu, spacing=PHANTOM_SPACING_MM, series_uid=generate_uid(), study_uid=study_uid,
                        description=f"phantom {seed}")


def seg_mask(seg: pydicom.Dataset, sources: list[pydicom.Dataset]) -> np.ndarray:
    """The SEG's frames on the source grid, (X=columns, Y=rows, Z=source order) uint8, via the referenced instances."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(seg)
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    mask = np.zeros((int(sources[0].Columns), int(sources[0].Rows), len(sources)), dtype=np.uint8)
    for frame, groups in zip(seg.pixel_array.reshape(-1, mask.shape[1], mask.shape[0]),
                             seg.PerFrameFunctionalGroupsSequence, strict=True):
        referenced = str(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        mask[:, :, index[referenced]] = frame.T
    return mask


def referenced_instances(seg: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs of the source images a SEG references."""
    return {str(item.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence}
