"""dicom-node: receives DICOM studies, runs analyses on them and files the results back to the PACS."""

__version__ = "0.1.0"
