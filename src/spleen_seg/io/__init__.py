"""Readers and writers of medical image formats: NIfTI, DICOM series, DICOM SEG, STL; atomic files, downloads."""
