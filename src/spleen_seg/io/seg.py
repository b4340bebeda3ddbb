"""DICOM Segmentation (SEG) of a CT series, written with highdicom."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from spleen_seg.io.atomic import atomic_path
from spleen_seg.io.dicom import DicomSeries
from spleen_seg.io.dicom_volume import series_headers, source_slice_index

SEG_SERIES_NUMBER = 901
# A reviewer's correction of the model's SEG (spleen-seg review): a series of its own.
CORRECTED_SEG_SERIES_NUMBER = 902
SEG_SEGMENT_LABEL = "Spleen"
SEG_MANUFACTURER = "spleen-seg"
# highdicom logs a dozen INFO lines per SEG ("copy attributes of module ..."), which the
# CLI would print for every DICOM case among its own one line per case.
logging.getLogger("highdicom").setLevel(logging.WARNING)


@dataclass(frozen=True)
class AlgorithmInfo:
    """What made a segmentation, recorded in the SEG's AlgorithmIdentificationSequence."""

    name: str
    version: str
    weights_sha256: str


def write_dicom_seg(mask: np.ndarray, series: DicomSeries, dest: str | Path, algorithm: AlgorithmInfo, *,
                    corrected: bool = False) -> Path:
    """Write ``mask`` as a DICOM Segmentation (BINARY, one segment "Spleen") of ``series``.

    ``corrected``: the mask is the model's, corrected by a reviewer: SegmentAlgorithmType
    SEMIAUTOMATIC (the model still named as the algorithm), series number
    ``CORRECTED_SEG_SERIES_NUMBER`` and a description that says so.

    ``mask`` is 0/1 (uint8 or bool) of shape (X, Y, Z) on the grid ``read_series``
    returns for ``series``. Each frame overlays one source slice and references it
    (ReferencedSOPInstanceUID, or the referenced frame of a multi-frame CT, plus its
    ImagePositionPatient); slices where the mask is
    empty are omitted, except that an all-empty mask keeps every frame so the SEG stays
    valid. Study, patient and frame of reference are taken from the source images.
    Written atomically; returns ``dest``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask)
    datasets = series_headers(series)
    slice_index = source_slice_index(series, datasets)
    expected = (int(datasets[0].Columns), int(datasets[0].Rows), len(slice_index))
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} differs from the grid (columns, rows, slices) {expected} of series {series.series_uid} in {series.folder}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("mask must hold only 0 and 1")
    # (source frames, rows, columns): frame f is slice slice_index[f] of the volume.
    frames = np.ascontiguousarray(mask.astype(np.uint8)[:, :, slice_index].transpose(2, 1, 0))
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEG_SEGMENT_LABEL,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Spleen,
        algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if corrected
                        else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC),
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=codes.DCM.ArtificialIntelligence,
            version=algorithm.version,
            parameters={"weights_sha256": algorithm.weights_sha256},
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=CORRECTED_SEG_SERIES_NUMBER if corrected else SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=SEG_MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        # The weights identify the "device" that made the segmentation.
        device_serial_number=algorithm.weights_sha256[:16] or "unknown",
        series_description=f"{SEG_SEGMENT_LABEL} segmentation ({algorithm.name} {algorithm.version}"
                           f"{', corrected by a reviewer' if corrected else ''})",
        omit_empty_frames=bool(frames.any()),
    )
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        seg.save_as(tmp)
    return dest


