"""Which series each analysis needs: pure rules over the attributes recorded at receipt."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dicom_node.state.records import SeriesInfo
from inference.base import SeriesCandidate, SeriesRule

#: Our own results are never analysed again (Manufacturer we write, see reports.identity).
OWN_MANUFACTURER = "dicom-node"
#: Objects that are never input to an analysis, whatever a rule says.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"})


@dataclass(frozen=True)
class Selection:
    """The series a rule selected, and for each series it passed over, the reason."""

    selected: tuple[SeriesInfo, ...]
    passed_over: tuple[tuple[SeriesInfo, str], ...]

    def explain(self) -> str:
        """Return why nothing (or only some) was selected, one reason per series."""
        if not self.passed_over:
            return "the study has no series"
        return "; ".join(
            f"series {info.series_uid} ({info.description or 'no description'}): {reason}"
            for info, reason in self.passed_over
        )


def slice_orientation(orientation: Sequence[float]) -> str:
    """Return ``axial``, ``sagittal`` or ``coronal`` from ImageOrientationPatient.

    The plane is that of the patient axis closest to the slice normal.
    """
    if len(orientation) != 6:
        raise ValueError("ImageOrientationPatient has 6 values")
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    normal = np.abs(np.cross(row, col))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def slice_count(info: SeriesInfo) -> int:
    """Return the number of images of a series (frames of a multi-frame instance)."""
    if info.instance_count == 1 and info.number_of_frames:
        return info.number_of_frames
    return info.instance_count


def check_series(info: SeriesInfo, rule: SeriesRule, default_min_slices: int) -> str | None:
    """Return why ``info`` does not satisfy ``rule``, or ``None`` when it does."""
    if info.manufacturer == OWN_MANUFACTURER:
        return "it is a result of this node"
    if info.modality in NON_IMAGE_MODALITIES:
        return f"modality {info.modality} is not an image series"
    if info.modality not in rule.modalities:
        return f"modality {info.modality or 'missing'} is not {'/'.join(rule.modalities)}"
    pattern = rule.description_pattern
    if pattern is not None and not re.search(pattern, info.description, re.IGNORECASE):
        return f"description does not match {pattern!r}"
    count = slice_count(info)
    minimum = rule.min_slices if rule.min_slices is not None else default_min_slices
    if count < minimum:
        return f"{count} slices, fewer than the minimum of {minimum}"
    if rule.max_slices is not None and count > rule.max_slices:
        return f"{count} slices, more than the maximum of {rule.max_slices}"
    if rule.max_matrix is not None and max(info.rows or 0, info.columns or 0) > rule.max_matrix:
        return f"matrix {info.rows}x{info.columns} is larger than {rule.max_matrix}"
    if rule.orientation != "any":
        if info.orientation is None:
            return "no ImageOrientationPatient"
        found = slice_orientation(info.orientation)
        if found != rule.orientation:
            return f"{found} slices, not {rule.orientation}"
    if rule.max_spacing_mm is not None:
        spacings = [*(info.pixel_spacing or ()), info.slice_thickness or 0.0]
        if not info.pixel_spacing:
            return "no PixelSpacing"
        if max(spacings) > rule.max_spacing_mm:
            return f"spacing {max(spacings):g} mm is coarser than {rule.max_spacing_mm:g} mm"
    return None


def select_series(
    series: Sequence[SeriesInfo], rule: SeriesRule, default_min_slices: int
) -> Selection:
    """Return the series of a study that ``rule`` accepts, with reasons for the others."""
    selected = []
    passed_over = []
    for info in series:
        reason = check_series(info, rule, default_min_slices)
        if reason is None:
            selected.append(info)
        else:
            passed_over.append((info, reason))
    if rule.choose is not None and len(selected) > 1:
        chosen = rule.choose([candidate(info) for info in selected]).series_uid
        for info in selected:
            if info.series_uid != chosen:
                passed_over.append((info, f"series {chosen} of the same study was preferred"))
        selected = [info for info in selected if info.series_uid == chosen]
    return Selection(tuple(selected), tuple(passed_over))


def candidate(info: SeriesInfo) -> SeriesCandidate:
    """Return what a rule's ``choose`` function sees of a series."""
    return SeriesCandidate(info.series_uid, info.convolution_kernel, info.slice_thickness,
                           slice_count(info))
