"""The universal 3D classifier under the name its AUC23 users import: ``universalclassifier.predict``.

A thin facade over :mod:`inference.classifier`; artifacts trained with ``dicom-node classifier
train`` or ``uc_train`` are what ``artifact_path`` names.
"""

from __future__ import annotations

from inference.classifier import predict

__all__ = ["predict"]
