"""The report as DICOM, for a PACS viewer: the spleen volume as a structured report, the preview as an image.

- ``write_volume_sr``: a Comprehensive 3D SR holding a TID 1500 Measurement Report with
  one volumetric ROI (TID 1411) that references the spleen segment of the DICOM SEG and
  carries its volume in millilitres (UCUM ``ml``), so viewers that read TID 1500 show the
  number beside the segmentation.
- ``write_preview_sc``: the preview PNG as a Secondary Capture image (RGB).

Both belong to the source study (patient and study attributes are taken from the
source images) and each is a new series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from spleen_seg.io.atomic import atomic_path
from spleen_seg.io.seg import AlgorithmInfo

SR_SERIES_NUMBER = 902
SC_SERIES_NUMBER = 903
# pydicom's UCUM dictionary has no plain millilitre; DICOM's volume examples code it so.
UCUM_MILLILITER = Code("ml", "UCUM", "milliliter")
MANUFACTURER = "spleen-seg"
TRACKING_IDENTIFIER = "Spleen"


def write_volume_sr(seg: Dataset, source_images: list[Dataset], volume_ml: float, dest: str | Path,
                    algorithm: AlgorithmInfo) -> Path:
    """Write the spleen volume of segment 1 of ``seg`` as a Comprehensive 3D SR (TID 1500); returns ``dest``.

    ``source_images`` are the headers of the segmented series (pixel data not needed):
    they are the evidence the report refers to with the SEG.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version,
                                                 parameters=[f"weights_sha256={algorithm.weights_sha256}"])
    volume = hd.sr.Measurement(name=codes.SCT.Volume, value=float(volume_ml), unit=UCUM_MILLILITER,
                               algorithm_id=algorithm_id)
    roi = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=TRACKING_IDENTIFIER),
        # Built by hand: highdicom's from_segmentation looks for the segment in the per-frame
        # groups, where a single-segment SEG keeps it in the shared ones.
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(source_images[0].SeriesInstanceUID)),
        finding_type=codes.SCT.Spleen,
        algorithm_id=algorithm_id,
        measurements=[volume],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[algorithm.name, algorithm.version, algorithm.weights_sha256]),
            name=algorithm.name, model_name=algorithm.version),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[roi],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *source_images],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"Spleen volume ({algorithm.name} {algorithm.version})",
    )
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        sr.save_as(tmp)
    return dest


def write_preview_sc(png: str | Path, reference: Dataset, dest: str | Path, algorithm: AlgorithmInfo) -> Path:
    """Write the preview PNG (RGB) as a Secondary Capture image of ``reference``'s study; returns ``dest``."""
    import highdicom as hd
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))  # (rows, columns, 3)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # Three views side by side (axial, coronal, sagittal): no single orientation
        # applies; the axial panel's: rows run to the patient's left, columns to posterior.
        patient_orientation=("L", "P"),
        series_description=f"Spleen preview ({algorithm.name} {algorithm.version})",
    )
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        sc.save_as(tmp)
    return dest
