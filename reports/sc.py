"""Build the one-page result summary as a Secondary Capture image in the source study."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from reports.comparison import Comparison
from reports.identity import Identity, copy_study_attributes, equipment_kwargs, source_headers
from reports.preview import MAX_SHOWN_SLICES, choose_key_slices, render_report_png
from reports.protocols import FindingLike, MeasurementLike, QualityLike, StructureLike

logger = logging.getLogger(__name__)


def _dominant_letter(vector: Sequence[float]) -> str:
    axis = int(np.argmax(np.abs(np.asarray(vector, dtype=float))))
    return (("R", "L"), ("A", "P"), ("F", "H"))[axis][int(vector[axis] > 0)]


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Return the Patient Orientation of the source's rows and columns, by main axis.

    The key slices on the page keep the source's in-plane orientation, so its row and
    column directions hold for every panel (PS3.3 C.7.6.1.1.1).

    Parameters
    ----------
    source
        A source image with Image Orientation (Patient).

    Returns
    -------
    tuple[str, str] or None
        E.g. ``("L", "P")`` for an axial image, ``None`` without orientation.
    """
    orientation = [float(v) for v in source.get("ImageOrientationPatient", [])]
    if len(orientation) != 6:
        return None
    return _dominant_letter(orientation[:3]), _dominant_letter(orientation[3:])


def build_report_image(
    source_images: Sequence[Dataset],
    label_map: np.ndarray | None,
    structures: Sequence[StructureLike],
    measurements: Sequence[MeasurementLike],
    findings: Sequence[FindingLike] = (),
    *,
    key_slices: Sequence[int] | None = None,
    title: str,
    model_name: str,
    model_version: str,
    method: str,
    identity: Identity,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    series_description: str,
    quality: QualityLike | None = None,
    comparison: Comparison | None = None,
    notes: Sequence[str] = (),
) -> Dataset:
    """Build the RGB Secondary Capture summary page of one analysis.

    The page is drawn by :func:`reports.preview.render_report_png`; it carries the
    patient's name and ID, so Burned In Annotation is ``YES``. The key slices shown
    are listed in Source Image Sequence.

    Parameters
    ----------
    source_images
        The analysed single-frame images, in slice order, with pixel data.
    label_map
        Labels of shape ``(n_slices, rows, columns)``, or ``None``.
    structures
        The structures in `label_map`.
    measurements
        Measurements to list.
    findings
        Classification findings to list.
    key_slices
        Slice indices to show, or ``None`` to choose the largest structure areas.
    title
        Heading of the page.
    model_name, model_version
        The model that produced the result.
    method
        One line on how the result was produced.
    identity
        Equipment identification.
    series_instance_uid, sop_instance_uid
        UIDs of the new series and instance.
    series_number, instance_number
        Series Number and Instance Number of the new instance.
    series_description
        Series Description of the new series.
    quality
        The analysis' judgement of its result; a low-confidence result is marked in red on
        the page and in Image Comments.
    comparison
        The change since the prior study, drawn as its own section with the trend.
    notes
        Further lines for the reader (side, normal range).

    Returns
    -------
    pydicom.dataset.Dataset
        The image (a :class:`highdicom.sc.SCImage`).

    Raises
    ------
    ValueError
        If there are no source images or the label map or key slices do not fit them.
    """
    if len(source_images) == 0:
        raise ValueError("no source images given")
    if key_slices is None or len(key_slices) == 0:
        n_slices = len(source_images)
        if label_map is not None and label_map.shape[0] != n_slices:
            raise ValueError(
                f"label_map has {label_map.shape[0]} slices, the source series {n_slices}"
            )
        key_slices = choose_key_slices(label_map, structures, n_slices)
    key_slices = [int(k) for k in key_slices][:MAX_SHOWN_SLICES]
    pixels = render_report_png(
        source_images,
        label_map,
        structures,
        measurements,
        findings,
        key_slices=key_slices,
        title=title,
        model_name=model_name,
        model_version=model_version,
        method=method,
        identity=identity,
        quality=quality,
        comparison=comparison,
        notes=notes,
    )
    reference = source_headers(source_images[:1])[0]
    orientation = patient_orientation(reference)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        patient_orientation=orientation or ("L", "P"),
        series_description=series_description,
        **equipment_kwargs(identity),
    )
    if orientation is None:
        # Type 2C (PS3.3 C.7.6.1): empty when the source gives no orientation.
        image.PatientOrientation = []
    # General Series Laterality is Type 2C on a paired body part, which dciodvfy cannot
    # judge and so reports as missing; empty means unknown (PS3.3 C.7.3.1).
    image.Laterality = str(source_images[0].get("Laterality") or "")
    # A page rendered by software, not a digitised film or video (PS3.3 C.8.6.1).
    image.ConversionType = "WSD"
    image.BurnedInAnnotation = "YES"
    image.DerivationDescription = f"Result summary of {model_name} {model_version}"[:1024]
    if quality is not None and quality.low_confidence:
        image.ImageComments = ("LOW CONFIDENCE: " + "; ".join(quality.reasons))[:10240]
    image.SourceImageSequence = []
    for index in key_slices:
        item = Dataset()
        item.ReferencedSOPClassUID = source_images[index].SOPClassUID
        item.ReferencedSOPInstanceUID = source_images[index].SOPInstanceUID
        image.SourceImageSequence.append(item)
    copy_study_attributes(source_images[0], image)
    logger.info(
        "built report image %s: %dx%d, key slices %s",
        sop_instance_uid,
        int(image.Columns),
        int(image.Rows),
        list(key_slices),
    )
    return image
