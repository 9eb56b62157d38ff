"""Deployment of dicom-node: compose stack, images, example configuration and the local process stack."""
