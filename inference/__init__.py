"""Analyses the node runs: volumes in, label maps and measurements out (no networking, no DICOM writing)."""
