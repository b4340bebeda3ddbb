"""The DICOM node: receive CT series from a PACS, segment them, send the results back."""
