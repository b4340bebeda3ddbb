"""Segment CT volumes: the reference bundle's inference pipeline as a library call, and
the ``segment`` command's batch driver (inputs, outputs, reports, previews).

``Segmenter`` computes what the bundle's ``inference.json`` computes (see its docstring
for the exact savings); ``segment_files`` reads inputs ahead while the network runs and
writes each case's folder atomically.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from spleen_seg import __version__
from spleen_seg.backends import Runner, make_runner
from spleen_seg.config import RECIPE, Recipe
from spleen_seg.errors import InputImageError, SpleenSegError
from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.io.nifti import Geometry, case_id, is_nifti, read_volume, write_mask
from spleen_seg.resample import Reorientation, index_box, resample_linear, spacing_grid
from spleen_seg.windows import WindowStats, spleen_margin

if TYPE_CHECKING:
    from spleen_seg.io.dicom import DicomSeries
    from spleen_seg.report import CaseReport

# A NIfTI file or one DICOM CT series.
InputItem = Union[Path, "DicomSeries"]

logger = logging.getLogger(__name__)
MASK_FILENAME = "spleen.nii.gz"
RUN_INFO_FILENAME = "run_info.json"
SEG_FILENAME = "spleen_seg.dcm"
STL_FILENAME = "spleen.stl"
ALGORITHM_NAME = "spleen-seg"
# Case folder names keep letters, digits, '.', '_' and '-'; a DICOM series adds its number or this much UID.
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
SHORT_UID_CHARS = 8


def collect_inputs(inputs: list[str | Path]) -> list[InputItem]:
    """Expand folders into the NIfTI files they hold (sorted); keep files as given.

    A folder holding DICOM files becomes one input per CT series in it (searched
    recursively); non-CT series are skipped with a logged message. Missing paths are
    kept so that the batch reports them as failures one by one.
    """
    found: list[InputItem] = []
    for item in map(Path, inputs):
        if item.is_dir():
            from spleen_seg.io.dicom import find_series, is_dicom_folder

            if is_dicom_folder(item):
                series, skipped = find_series(item)
                for message in skipped:
                    logger.warning("%s: %s", item, message)
                found.extend(series)
                continue
            files = sorted(p for p in item.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
            if not files:
                raise InputImageError(f"{item}: folder holds no .nii or .nii.gz files")
            found.extend(files)
        else:
            found.append(item)
    return found


def _safe_name(text: str) -> str:
    return UNSAFE_NAME_CHARS.sub("_", text).strip("._") or "case"


def input_source(item: InputItem) -> Path:
    """The path an input came from: the NIfTI file, or the DICOM series' folder."""
    return item if isinstance(item, Path) else item.folder


def input_case_id(item: InputItem) -> str:
    """Output folder name: NIfTI file name without extension; DICOM folder name + series number (or short UID)."""
    if isinstance(item, Path):
        return case_id(item)
    import pydicom

    header = pydicom.dcmread(item.files[0], stop_before_pixels=True, specific_tags=["SeriesNumber"])
    number = header.get("SeriesNumber")
    suffix = f"s{number}" if number not in (None, "") else item.series_uid.replace(".", "")[-SHORT_UID_CHARS:]
    return _safe_name(f"{item.folder.name}_{suffix}")


def unique_case_ids(items: list[InputItem]) -> list[str]:
    """:func:`input_case_id` for each input, with ``_2``, ``_3``... appended to repeats."""
    ids: list[str] = []
    for item in items:
        base = input_case_id(item)
        name, count = base, 1
        while name in ids:
            count += 1
            name = f"{base}_{count}"
        ids.append(name)
    return ids


@dataclass
class Segmenter:
    """The bundle's inference on one volume, computed on a numpy fast path.

    Steps, each equal to the bundle's (see ``resample`` and ``windows``): reorient to
    RAS, resample to 1.5 x 1.5 x 2.0 mm (trilinear), window HU -57..164 to 0..1, sliding
    window 96^3 at overlap 0.5, softmax, invert to the input grid (trilinear), argmax.
    Exact savings: the network returns only the margin ``logit1 - logit0`` (argmax over
    two channels is its sign); inversion interpolates ``p1 - p0 = tanh(margin / 2)``
    (linear, so equal to inverting both channels) and only around the predicted spleen;
    windows far from any spleen candidate are skipped (``windows.spleen_margin``).
    """

    runner: Runner
    recipe: Recipe = RECIPE
    # Weights trained on MSD Task09 as shipped learned mirrored anatomy: its voxels are
    # stored LPS while the headers claim RAS (model-zoo issue #766). For such weights the
    # RAS-oriented input is mirrored left-right and front-back before the network, and
    # the prediction mirrored back, so the network sees anatomy as it did in training.
    mirror_xy: bool = False
    progress: bool = True
    # None computes every sliding window (MONAI's average everywhere; see windows.py).
    focus_radius: int | None = RECIPE.inference.focus_radius
    # On "cuda..." the resampling, windowing and inversion run on the GPU (torch tensors).
    device: str = "cpu"
    last_windows: WindowStats | None = field(default=None, init=False)

    def _to_device(self, array: np.ndarray):
        if not self.device.startswith("cuda"):
            return array
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def preprocess(self, array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, Reorientation]:
        """(X, Y, Z) HU -> (windowed image on the 1.5 x 1.5 x 2 mm RAS grid, its affine, reorientation)."""
        pre = self.recipe.preprocessing
        reorientation = Reorientation.for_affine(geometry.affine_ras, geometry.shape, pre.axcodes)
        ras = reorientation.apply(self._to_device(array))
        ras_affine = reorientation.affine(geometry.affine_ras)
        grid_shape, grid_affine = spacing_grid(tuple(ras.shape), ras_affine, pre.spacing_mm)
        image = resample_linear(ras, ras_affine, grid_affine, grid_shape)
        low, high = pre.hu_window
        image -= low
        image *= 1.0 / (high - low)
        if isinstance(image, np.ndarray):
            np.clip(image, 0.0, 1.0, out=image)
        else:  # the windows are cut on the host: the runner moves each batch to its device
            image = image.clamp_(0.0, 1.0).cpu().numpy()
        return image, grid_affine, reorientation

    def predict(self, array: np.ndarray, geometry: Geometry, source: str | Path = "") -> np.ndarray:
        """Segment one volume. ``array``: (X, Y, Z) HU in file voxel order.

        Returns a uint8 mask of shape (X, Y, Z) on the input grid, 1 = spleen.
        """
        image, grid_affine, reorientation = self.preprocess(array, geometry)
        if self.mirror_xy:
            image = np.ascontiguousarray(image[::-1, ::-1])
        inf = self.recipe.inference
        margin, self.last_windows = spleen_margin(
            image, self.runner, inf.roi_size, inf.overlap, self.runner.batch_size, self.focus_radius, self.progress
        )
        if self.mirror_xy:
            margin = margin[::-1, ::-1]
        ras_affine = reorientation.affine(geometry.affine_ras)
        mask_ras = invert_margin(self._to_device(margin), grid_affine, reorientation.ras_shape, ras_affine)
        mask = reorientation.undo(mask_ras)
        mask = np.ascontiguousarray(mask if isinstance(mask, np.ndarray) else mask.cpu().numpy())
        if mask.shape != geometry.shape:
            raise RuntimeError(f"inverted mask shape {mask.shape} differs from input {geometry.shape}")
        return mask


def _positive_box(margin) -> tuple[list[int], list[int]] | None:
    """(first, last) index per axis of the voxels with a positive margin; None if there are none."""
    if isinstance(margin, np.ndarray):
        index = np.nonzero(margin > 0)
        if index[0].size == 0:
            return None
        return [int(ix.min()) for ix in index], [int(ix.max()) for ix in index]
    import torch

    found = torch.nonzero(margin > 0)
    if found.shape[0] == 0:
        return None
    return found.min(dim=0).values.tolist(), found.max(dim=0).values.tolist()


def invert_margin(margin, grid_affine: np.ndarray, ras_shape: tuple[int, ...], ras_affine: np.ndarray):
    """Spleen mask on the RAS input grid from the margin on the preprocessed grid.

    Interpolates ``p1 - p0 = tanh(margin / 2)`` trilinearly (as ``Invertd`` does for the
    two softmax channels) and only inside the box of positive margin: outside it every
    interpolation neighbour is negative, so the mask is 0 there. ``margin`` is a numpy
    array or a torch tensor; the mask (uint8) is of the same kind and device.
    """
    mask: Any
    tanh: Any
    if isinstance(margin, np.ndarray):
        mask = np.zeros(ras_shape, dtype=np.uint8)
        tanh = np.tanh
    else:
        import torch

        mask = torch.zeros(ras_shape, dtype=torch.uint8, device=margin.device)
        tanh = torch.tanh
    box = _positive_box(margin)
    if box is None:
        return mask
    src_box = tuple(slice(max(lo - 1, 0), min(hi + 2, n)) for lo, hi, n in zip(*box, margin.shape, strict=True))
    crop_affine = grid_affine.copy()
    crop_affine[:3, 3] = grid_affine[:3, :3] @ [b.start for b in src_box] + grid_affine[:3, 3]
    probs = tanh(margin[src_box] * 0.5)
    dst_box = index_box(ras_affine, grid_affine, src_box, ras_shape, tuple(margin.shape))
    dst_shape = tuple(b.stop - b.start for b in dst_box)
    if min(dst_shape) <= 0:
        return mask
    # Map destination voxels into the crop's index space (border padding as MONAI).
    values = resample_linear(probs, crop_affine, ras_affine, dst_shape, tuple(b.start for b in dst_box))
    mask[dst_box] = values > 0
    return mask


def load_segmenter(weights: Path, device: str, backend: str = "auto", *, mirror_xy: bool = False,
                   progress: bool = True, all_windows: bool = False, precision: str = "fp32") -> Segmenter:
    """Build the runner for ``weights`` on ``device`` with ``backend`` (see ``backends``).

    ``precision="fp16"``: AMP autocast for torch on CUDA, an fp16 engine for TensorRT.
    """
    focus = None if all_windows else RECIPE.inference.focus_radius
    return Segmenter(runner=make_runner(weights, backend, device, precision), mirror_xy=mirror_xy, progress=progress,
                     focus_radius=focus, device=device)


@dataclass(frozen=True)
class SegmentOptions:
    """What ``segment`` writes and checks besides the NIfTI mask."""

    largest_component: bool = False
    strict: bool = False
    stl: bool = False
    preview: bool = True
    all_windows: bool = False
    precision: str = "fp32"
    # None: decide from the weights (see network.weights_orientation_convention).
    weights_convention: str | None = None


@dataclass
class CaseResult:
    source: Path
    output: Path | None = None
    error: str | None = None
    spleen_ml: float = 0.0
    seconds: float = 0.0
    case: str = ""
    # ok, not_found (segmented, empty mask) or failed.
    status: str = "ok"
    report: CaseReport | None = None


def write_run_info(out_dir: Path, weights: Path, device: str, backend: str, inputs: list[InputItem],
                   orientation_convention: str | None = None) -> None:
    """Record how the outputs were made: versions, weights checksum, convention, recipe, inputs."""
    from dataclasses import asdict
    from importlib.metadata import PackageNotFoundError, version

    from spleen_seg.data import file_sha256

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    info = {
        "spleen_seg_version": __version__,
        "versions": {p: installed(p) for p in ("monai", "torch", "openvino", "onnxruntime", "nibabel", "numpy")},
        "python": platform.python_version(),
        "command": sys.argv,
        "weights": str(weights),
        "weights_sha256": file_sha256(weights),
        "orientation_convention": orientation_convention,
        "device": device,
        "backend": backend,
        "recipe": asdict(RECIPE),
        "inputs": [str(p) if isinstance(p, Path) else f"{p.folder} (series {p.series_uid})" for p in inputs],
    }
    atomic_write_text(out_dir / RUN_INFO_FILENAME, json.dumps(info, indent=2, default=str) + "\n")


def load_input(source: InputItem) -> tuple[np.ndarray, Geometry]:
    """(X, Y, Z) float32 HU and geometry of a NIfTI file or a DICOM series."""
    return read_volume(source) if isinstance(source, Path) else _read_series(source)


def segment_one(segmenter: Segmenter, source: InputItem, out_dir: Path, *, case: str | None = None,
                options: SegmentOptions | None = None, model: dict[str, Any] | None = None,
                prefetched: Future | None = None) -> CaseResult:
    """Read, segment and write one input into ``out_dir/<case>/``; user errors become ``CaseResult.error``.

    Writes ``spleen.nii.gz``, ``report.json`` and ``preview.png``; for a DICOM series also
    ``spleen_seg.dcm``; with ``options.stl`` also ``spleen.stl`` (not for an empty mask).
    The files are written into a hidden temporary folder renamed to ``<case>`` at the end,
    so a failure or a kill leaves no partial case folder. ``prefetched`` is a future of
    :func:`load_input` already reading this input (batch mode overlaps reading and compute).
    """
    from spleen_seg.report import REPORT_FILENAME, build_report, check_intensity, keep_components, write_report

    options = options or SegmentOptions()
    case = case or input_case_id(source)
    path = input_source(source)
    case_dir = out_dir / case
    work_dir = out_dir / f".{case}.partial-{os.getpid()}"
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    start = clock

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 4)
        clock = now

    try:
        array, geometry = prefetched.result() if prefetched is not None else load_input(source)
        warnings = check_intensity(array, str(path), options.strict)
        lap("read")
        raw_mask = segmenter.predict(array, geometry, path)
        lap("segment")
        components = keep_components(raw_mask, options.largest_component)
        mask = components.mask
        report = build_report(case, str(path), mask, array, geometry, components, warnings)
        report.model = dict(model or {})
        lap("measure")
        shutil.rmtree(work_dir, ignore_errors=True)
        outputs = _write_outputs(mask, array, geometry, source, work_dir, report, options, lap)
        report.outputs = {name: str(case_dir / dest.name) for name, dest in outputs.items()}
        report.timings_s = {**timings, "total": round(time.perf_counter() - start, 4)}
        write_report(report, work_dir / REPORT_FILENAME)
        _publish(work_dir, case_dir)
    except SpleenSegError as err:
        return CaseResult(source=path, error=str(err), case=case, status="failed")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return CaseResult(source=path, output=case_dir / outputs["mask"].name, spleen_ml=report.volume_ml,
                      seconds=time.perf_counter() - start, case=case,
                      status="ok" if report.spleen_found else "not_found", report=report)


def _publish(work_dir: Path, case_dir: Path) -> None:
    """Replace ``case_dir`` by the finished ``work_dir`` (an earlier run's folder is removed)."""
    if case_dir.exists():
        stale = case_dir.with_name(f".{case_dir.name}.old-{os.getpid()}")
        os.replace(case_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(work_dir, case_dir)


def _warm_imports() -> None:
    """Import the output writers' libraries while the network runs (its runtime releases the GIL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure  # noqa: F401
    import scipy.ndimage  # noqa: F401


def _read_series(series: DicomSeries) -> tuple[np.ndarray, Geometry]:
    from spleen_seg.io.dicom import read_series

    return read_series(series)


def _write_outputs(mask: np.ndarray, image: np.ndarray, geometry: Geometry, source: InputItem, case_dir: Path,
                   report: CaseReport, options: SegmentOptions, lap) -> dict[str, Path]:
    """Write the mask files and preview of one case; ``lap(stage)`` records each stage's time."""
    outputs = {"mask": write_mask(mask, geometry, case_dir / MASK_FILENAME)}
    lap("write_nifti")
    if not isinstance(source, Path):
        from spleen_seg.io.dicom import AlgorithmInfo, write_dicom_seg

        algorithm = AlgorithmInfo(name=ALGORITHM_NAME, version=__version__,
                                  weights_sha256=str(report.model.get("weights_sha256", "")))
        outputs["dicom_seg"] = write_dicom_seg(mask, source, case_dir / SEG_FILENAME, algorithm)
        lap("write_dicom_seg")
    if options.stl:
        if report.spleen_found:
            from spleen_seg.io.dicom import write_stl

            outputs["stl"] = write_stl(mask, geometry.affine_ras, case_dir / STL_FILENAME)
            lap("write_stl")
        else:
            report.warnings.append("no STL written: the mask is empty")
    if options.preview:
        from spleen_seg.preview import PREVIEW_FILENAME, write_preview

        title = (f"{report.case}: spleen {report.volume_ml:.1f} mL" if report.spleen_found
                 else f"{report.case}: spleen not found")
        outputs["preview"] = write_preview(image, mask, geometry.affine_ras, case_dir / PREVIEW_FILENAME, title)
        lap("preview")
    return outputs


def segment_files(
    inputs: list[InputItem], out_dir: Path, weights: Path, device: str, *, backend: str = "auto",
    progress: bool = True, options: SegmentOptions | None = None,
) -> list[CaseResult]:
    """Segment every input into ``out_dir/<case>/``, then write ``out_dir/summary.csv``.

    Failures do not stop the batch. Weights trained under the MSD orientation convention
    see their inputs mirrored left-right and front-back (``Segmenter.mirror_xy``).
    """
    from spleen_seg.data import file_sha256
    from spleen_seg.network import CONVENTION_MSD, weights_orientation_convention
    from spleen_seg.report import SUMMARY_FILENAME, SummaryRow, write_summary

    options = options or SegmentOptions()
    convention = weights_orientation_convention(weights, options.weights_convention)
    # Overlap: the runner compiles and the next input is read while the current one computes.
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="spleen-seg-io") as pool:
        pending = pool.submit(load_segmenter, weights, device, backend, mirror_xy=convention == CONVENTION_MSD,
                              progress=progress, all_windows=options.all_windows, precision=options.precision)
        reads = {0: pool.submit(load_input, inputs[0])} if inputs else {}
        segmenter = pending.result()
        if options.preview:  # after the start-up work, so that it overlaps the network instead
            pool.submit(_warm_imports)
        model = {"name": ALGORITHM_NAME, "version": __version__, "weights": str(Path(weights).resolve()),
                 "weights_sha256": file_sha256(weights), "orientation_convention": convention,
                 "device": str(device), "backend": segmenter.runner.backend}
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(out_dir, weights, device, segmenter.runner.backend, inputs, orientation_convention=convention)
        results = []
        for index, (source, case) in enumerate(zip(inputs, unique_case_ids(inputs), strict=True)):
            logger.info("[%d/%d] %s", index + 1, len(inputs), input_source(source))
            if index + 1 < len(inputs):
                reads[index + 1] = pool.submit(load_input, inputs[index + 1])
            results.append(segment_one(segmenter, source, out_dir, case=case, options=options, model=model,
                                       prefetched=reads.pop(index)))
    rows = [SummaryRow(case=r.case, source=str(r.source), status=r.status, report=r.report, error=r.error or "")
            for r in results]
    write_summary(rows, out_dir / SUMMARY_FILENAME)
    return results
