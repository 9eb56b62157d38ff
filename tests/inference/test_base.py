"""Tests for inference.base: the helpers of the analysis interface."""

from __future__ import annotations

from pydicom.dataset import Dataset

from inference.base import join_values


def test_join_values_writes_several_values_as_dicom_encodes_them() -> None:
    ds = Dataset()
    ds.ConvolutionKernel = ["FC13", "AIDR 3D"]
    assert join_values(ds.ConvolutionKernel) == "FC13\\AIDR 3D"
    assert join_values(["B30f"]) == "B30f"


def test_join_values_keeps_single_and_empty_values() -> None:
    ds = Dataset()
    ds.ConvolutionKernel = "B30f"
    assert join_values(ds.ConvolutionKernel) == "B30f"
    assert join_values(ds.get("SliceThickness")) == ""
    assert join_values("") == ""
    assert join_values([]) == ""
