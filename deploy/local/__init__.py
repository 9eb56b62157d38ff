"""The dicom-node stack as plain processes (Orthanc from Debian, the node), for machines without Docker."""
