"""Build a DICOM Segmentation (SEG) of labelled structures over the source series."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from reports.identity import (
    Identity,
    build_algorithm_identification,
    coded,
    copy_study_attributes,
    equipment_kwargs,
    source_headers,
)
from reports.protocols import StructureLike

logger = logging.getLogger(__name__)


def validate_label_map(
    source_images: Sequence[Dataset],
    label_map: np.ndarray,
    structures: Sequence[StructureLike],
) -> None:
    """Check that a label map fits its source series and its structure list.

    Parameters
    ----------
    source_images
        The single-frame source images, in the label map's slice order.
    label_map
        Integer array of shape ``(n_slices, rows, columns)``.
    structures
        The structures the labels stand for.

    Raises
    ------
    ValueError
        If there are no sources or structures, the shape does not match the sources,
        the array is not integer, labels are duplicated or not positive, or the map
        holds a label that no structure describes.
    """
    if len(source_images) == 0:
        raise ValueError("no source images given")
    if len(structures) == 0:
        raise ValueError("no structures given")
    if label_map.ndim != 3:
        raise ValueError(
            f"label_map must have shape (n_slices, rows, columns), got shape {label_map.shape}"
        )
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == np.bool_):
        raise ValueError(f"label_map must hold integer labels, got dtype {label_map.dtype}")
    first = source_images[0]
    expected = (len(source_images), int(first.Rows), int(first.Columns))
    if label_map.shape != expected:
        raise ValueError(
            f"label_map shape {label_map.shape} does not match the source series "
            f"(n_slices, rows, columns) = {expected}"
        )
    labels = [int(s.label) for s in structures]
    if len(set(labels)) != len(labels):
        raise ValueError(f"structure labels must be unique, got {labels}")
    if min(labels) < 1:
        raise ValueError(f"structure labels must be positive, got {labels}")
    present = {int(v) for v in np.unique(label_map)} - {0}
    unknown = sorted(present - set(labels))
    if unknown:
        raise ValueError(
            f"label_map holds labels {unknown} that no structure describes (structures: {labels})"
        )


def build_segment_descriptions(
    structures: Sequence[StructureLike], identity: Identity
) -> list[hd.seg.SegmentDescription]:
    """Describe one segment per structure, numbered by position from 1.

    Parameters
    ----------
    structures
        The structures, in segment order.
    identity
        Where the algorithm identification comes from.

    Returns
    -------
    list[highdicom.seg.SegmentDescription]
        Segment ``i + 1`` describes ``structures[i]``.
    """
    algorithm = build_algorithm_identification(identity)
    descriptions = []
    for number, structure in enumerate(structures, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=structure.name,
            segmented_property_category=coded(structure.category),
            segmented_property_type=coded(structure.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*structure.colour_rgb),
        )
        if structure.laterality is not None:
            # Laterality qualifies the property type (PS3.3 C.8.20.2, CID 244).
            type_item = description.SegmentedPropertyTypeCodeSequence[0]
            type_item.SegmentedPropertyTypeModifierCodeSequence = [coded(structure.laterality)]
        descriptions.append(description)
    return descriptions


def build_segmentation(
    source_images: Sequence[Dataset],
    label_map: np.ndarray,
    structures: Sequence[StructureLike],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    series_description: str,
    identity: Identity,
) -> Dataset:
    """Build a binary DICOM Segmentation with one segment per structure.

    Frame references follow the slice order: slice ``k`` of `label_map` is written as
    a frame referring to ``source_images[k]``. Empty frames are omitted to keep the
    object small, except when a structure has no voxel at all: then every frame is
    kept, so that each segment still has frames (some viewers reject segments without
    any) and the absence is explicit.

    Parameters
    ----------
    source_images
        The single-frame source images, in the label map's slice order.
    label_map
        Integer array of shape ``(n_slices, rows, columns)``, 0 for background and
        ``structure.label`` for each structure.
    structures
        The structures; segment ``i + 1`` is ``structures[i]``.
    series_instance_uid, sop_instance_uid
        UIDs of the new series and instance.
    series_number, instance_number
        Series Number and Instance Number of the new instance.
    series_description
        Series Description of the new series.
    identity
        Equipment and algorithm identification.

    Returns
    -------
    pydicom.dataset.Dataset
        The segmentation (a :class:`highdicom.seg.Segmentation`).

    Raises
    ------
    ValueError
        If the label map does not fit the sources or the structures.
    """
    validate_label_map(source_images, label_map, structures)
    dtype = np.uint8 if len(structures) < 256 else np.uint16
    segments = np.zeros(label_map.shape, dtype=dtype)
    empty = []
    for number, structure in enumerate(structures, start=1):
        mask = label_map == structure.label
        if not mask.any():
            empty.append(structure.name)
        segments[mask] = number
    if empty:
        logger.info(
            "segmentation %s: empty segments %s, keeping all frames", sop_instance_uid, empty
        )
    headers = source_headers(source_images)
    rows, columns = label_map.shape[1:]
    if (rows * columns) % 8:
        # A BINARY SEG packs 1-bit frames back to back, so a frame whose pixel count is not a
        # multiple of 8 starts mid-byte (PS3.5 8.1.1, allowed); OHIF 3.13 decodes such frames
        # shifted. An 8-bit FRACTIONAL SEG with values 0/1 means the same and displays right.
        pixel_array: np.ndarray = np.stack(
            [label_map == s.label for s in structures], axis=-1
        ).astype(np.float32)
        segmentation_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixel_array = segments
        segmentation_type = hd.seg.SegmentationTypeValues.BINARY
    segmentation = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        max_fractional_value=1,  # used by FRACTIONAL only: values are exactly 0 or 1
        segment_descriptions=build_segment_descriptions(structures, identity),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        series_description=series_description,
        content_description=series_description,
        omit_empty_frames=not empty,
        **equipment_kwargs(identity),
    )
    copy_study_attributes(source_images[0], segmentation)
    logger.info(
        "built segmentation %s: %d segments, %d frames",
        sop_instance_uid,
        len(structures),
        int(segmentation.NumberOfFrames),
    )
    return segmentation
