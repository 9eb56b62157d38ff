"""Test suite of dicom-node; a package so that helpers import as ``tests.<...>``."""
