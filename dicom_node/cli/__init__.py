"""The ``dicom-node`` command."""
