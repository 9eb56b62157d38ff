"""Build a TID 1500 measurement report (Comprehensive 3D SR) of structures and findings."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from reports.comparison import Comparison
from reports.identity import (
    Identity,
    build_sr_algorithm_identification,
    coded,
    copy_study_attributes,
    source_headers,
)
from reports.outline import outline_largest_section
from reports.protocols import Code, FindingLike, MeasurementLike, QualityLike, StructureLike
from reports.uids import derive_uid

#: A structure is outlined only where one outline is faithful to it: at most this fraction of
#: its pixels on that slice may lie outside the outline or be holes inside it.
MAX_OUTLINE_MISMATCH = 0.1

logger = logging.getLogger(__name__)

#: Private coding scheme for classification labels, which analyses give as plain
#: strings (PS3.16 8.2: private designators start with "99").
LABEL_SCHEME = "99DCMNODE"

#: UCUM "no units", the unit of a probability between 0 and 1.
NO_UNITS: Code = ("1", "UCUM", "no units")

_ANATOMICAL_STRUCTURE = "91723000"


def derive_tracking_uid(seed: str, *parts: str) -> str:
    """Derive a tracking UID that is the same whenever the seed and parts are.

    Parameters
    ----------
    seed
        A string identifying the result, for example study UID, analysis and model
        version, so that a re-run tracks the same things with the same UIDs.
    *parts
        What is tracked within the result.

    Returns
    -------
    str
        A UID under the 2.25 root (PS3.5 B.2).
    """
    return derive_uid("tracking", seed, *parts)


def _label_code(text: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=text, scheme_designator=LABEL_SCHEME, meaning=text[:64])


def _probability_code(class_name: str) -> hd.sr.CodedConcept:
    meaning = f"Probability of {class_name}"
    return hd.sr.CodedConcept(
        value=f"P({class_name})", scheme_designator=LABEL_SCHEME, meaning=meaning[:64]
    )


def _key_slice_region(
    mask: np.ndarray, source_images: Sequence[Dataset]
) -> hd.sr.ImageRegion | None:
    """The outline of `mask` where it is largest; ``None`` if empty or not one compact region."""
    outline = outline_largest_section(mask, MAX_OUTLINE_MISMATCH)
    if outline is None:
        return None
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline.points,
        source_image=hd.sr.SourceImageForRegion.from_source_image(
            source_images[outline.slice_index]
        ),
    )


def _measurement(measurement: MeasurementLike) -> hd.sr.Measurement:
    # The algorithm is identified once per group, which applies to its measurements.
    return hd.sr.Measurement(
        name=coded(measurement.concept),
        value=float(measurement.value),
        unit=coded(measurement.unit),
    )


def _check_segmentation(segmentation: Dataset, structures: Sequence[StructureLike]) -> None:
    segments = segmentation.get("SegmentSequence", [])
    labels = [str(item.SegmentLabel) for item in segments]
    names = [structure.name for structure in structures]
    if labels != names:
        raise ValueError(
            f"segmentation {segmentation.SOPInstanceUID} has segments {labels}, "
            f"expected one per structure in order: {names}"
        )


def _structure_tracking(seed: str, structure: StructureLike) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=derive_tracking_uid(seed, "structure", str(structure.label)),
        identifier=structure.name,
    )


def _whole_series_tracking(seed: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=derive_tracking_uid(seed, "image"), identifier="whole series"
    )


def _finding_sites(structure: StructureLike) -> list[hd.sr.FindingSite] | None:
    if structure.laterality is None or structure.category[0] != _ANATOMICAL_STRUCTURE:
        return None
    return [
        hd.sr.FindingSite(
            anatomic_location=coded(structure.property_type),
            laterality=coded(structure.laterality),
        )
    ]


def build_structure_groups(
    source_images: Sequence[Dataset],
    structures: Sequence[StructureLike],
    measurements: Sequence[MeasurementLike],
    segmentation: Dataset,
    *,
    tracking_seed: str,
    identity: Identity,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """Build one volumetric ROI group (TID 1411) per structure, referencing its segment.

    Parameters
    ----------
    source_images
        The source series the segmentation was made on.
    structures
        The structures; ``structures[i]`` is segment ``i + 1`` of `segmentation`.
    measurements
        Measurements; those whose ``structure_label`` is a structure's label go into
        that structure's group, others are ignored.
    segmentation
        The segmentation the groups refer to.
    tracking_seed
        Seed of the deterministic tracking UIDs.
    identity
        Algorithm identification.

    Returns
    -------
    list[highdicom.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]
        One group per structure, in structure order.
    """
    source_series = hd.sr.SourceSeriesForSegmentation(
        referenced_series_instance_uid=str(source_images[0].SeriesInstanceUID)
    )
    groups = []
    for number, structure in enumerate(structures, start=1):
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_structure_tracking(tracking_seed, structure),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(segmentation.SOPClassUID),
                sop_instance_uid=str(segmentation.SOPInstanceUID),
                segment_number=number,
                source_series=source_series,
            ),
            finding_type=coded(structure.property_type),
            finding_category=coded(structure.category),
            finding_sites=_finding_sites(structure),
            algorithm_id=build_sr_algorithm_identification(identity),
            measurements=[
                _measurement(m) for m in measurements if m.structure_label == structure.label
            ],
        )
        groups.append(group)
    return groups


def build_location_groups(
    source_images: Sequence[Dataset],
    structures: Sequence[StructureLike],
    label_map: np.ndarray,
    *,
    tracking_seed: str,
    identity: Identity,
    whole_series: bool,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Build one planar ROI group (TID 1410) per structure: where it is largest.

    Each group outlines its structure on the source image where the structure's
    cross-section is largest (along its pixels' edges) and carries the tracking
    identifier and UID of the structure's volumetric group, so that it tracks the same
    structure. It holds no measurements of its own: the segment defines the structure
    and the volumetric group holds its measurements. Viewers that place measurements on
    images use it to show them; OHIF, which merges groups by tracking UID, shows only
    measurements that have such an outline.

    A structure whose largest section is not one compact region (several parts, or
    holes: a ring of subcutaneous fat, muscles on both sides of the spine) gets no
    group, since no single outline would show it faithfully (see
    :data:`MAX_OUTLINE_MISMATCH`); its SEG segment shows it.

    Parameters
    ----------
    source_images
        The source series, in the label map's slice order.
    structures
        The structures; an empty one gets no group.
    label_map
        Integer array ``(slices, rows, columns)``, ``structure.label`` for each structure.
    tracking_seed
        Seed of the deterministic tracking UIDs (as for the volumetric groups).
    identity
        Algorithm identification.
    whole_series
        Also outline all structures together, tracked as the whole-series group is.

    Returns
    -------
    list[highdicom.sr.PlanarROIMeasurementsAndQualitativeEvaluations]
        The groups, in structure order, the whole-series one last.
    """
    algorithm = build_sr_algorithm_identification(identity)
    groups = []
    for structure in structures:
        region = _key_slice_region(label_map == structure.label, source_images)
        if region is None:
            continue
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_structure_tracking(tracking_seed, structure),
                referenced_region=region,
                finding_type=coded(structure.property_type),
                finding_category=coded(structure.category),
                finding_sites=_finding_sites(structure),
                algorithm_id=algorithm,
            )
        )
    if whole_series:
        union = np.isin(label_map, [structure.label for structure in structures])
        region = _key_slice_region(union, source_images)
        if region is not None:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_whole_series_tracking(tracking_seed),
                    referenced_region=region,
                    algorithm_id=algorithm,
                )
            )
    return groups


def build_finding_group(
    finding: FindingLike,
    source_images: Sequence[Dataset],
    *,
    tracking_seed: str,
    identity: Identity,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Build a measurement group (TID 1501) for one classification finding.

    The predicted class is a qualitative evaluation of the finding's concept; each
    class probability is a measurement in UCUM "no units". Class names, given as plain
    strings, are coded in the private scheme :data:`LABEL_SCHEME`.

    Parameters
    ----------
    finding
        The classification output.
    source_images
        The classified images, referenced by the group.
    tracking_seed
        Seed of the deterministic tracking UID.
    identity
        Algorithm identification.

    Returns
    -------
    highdicom.sr.MeasurementsAndQualitativeEvaluations
        The group.
    """
    algorithm = build_sr_algorithm_identification(identity)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_tracking_uid(tracking_seed, "finding", finding.name),
            identifier=finding.name,
        ),
        finding_type=coded(finding.concept),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=coded(finding.concept), value=_label_code(finding.predicted_class)
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=_probability_code(class_name),
                value=float(probability),
                unit=coded(NO_UNITS),
            )
            for class_name, probability in finding.probabilities.items()
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(image)
            for image in source_images
        ],
    )


#: TID 1500 qualitative evaluation of the whole result: "Analysis Quality Rating" (DCM 111693,
#: the rating CAD reports use for the quality of an automated analysis) valued with the CID 6044
#: pair "Usable - Meets / Does not meet the quality control standard" (DCM 111237 / 111236):
#: standard codes a receiving system can test without parsing text.
ANALYSIS_QUALITY_RATING: Code = ("111693", "DCM", "Analysis Quality Rating")
MEETS_QUALITY_STANDARD: Code = ("111237", "DCM", "Usable - Meets the quality control standard")
FAILS_QUALITY_STANDARD: Code = ("111236", "DCM", "Usable - Does not meet the quality control standard")
QUALITY_TRACKING_ID = "Result quality"


def build_quality_group(
    quality: QualityLike,
    headers: Sequence[Dataset],
    *,
    tracking_seed: str,
    identity: Identity,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group that records how far the analysis trusts its result.

    One qualitative evaluation, :data:`ANALYSIS_QUALITY_RATING`, valued
    :data:`FAILS_QUALITY_STANDARD` for a low-confidence result and
    :data:`MEETS_QUALITY_STANDARD` otherwise; the group's tracking identifier is
    ``"Result quality"`` followed by the reasons, so a reader sees why.

    Parameters
    ----------
    quality
        The analysis' judgement.
    headers
        The source images (without pixel data).
    tracking_seed
        Seed of the deterministic tracking UID.
    identity
        Algorithm identification.
    """
    text = QUALITY_TRACKING_ID
    if quality.low_confidence:
        text += ": low confidence: " + "; ".join(quality.reasons)
    value = FAILS_QUALITY_STANDARD if quality.low_confidence else MEETS_QUALITY_STANDARD
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_tracking_uid(tracking_seed, "quality"), identifier=text
        ),
        algorithm_id=build_sr_algorithm_identification(identity),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(coded(ANALYSIS_QUALITY_RATING), coded(value))
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image) for image in headers],
    )


#: The change since the prior study, per measurement, as TID 1501 groups. DCM and SCT define no
#: concept for "volume change", so it is coded in this product's own scheme (declared in the
#: document's Coding Scheme Identification); the percent change is DCM "Fractional Change" in
#: UCUM "%", its annualised rate the same concept in "%/a", and the time between the studies SCT
#: "Interval" in days. The prior SR is listed in Pertinent Other Evidence (PS3.3 C.17.2.3).
VOLUME_CHANGE: Code = ("volume-change", LABEL_SCHEME, "Volume change since prior study")
FRACTIONAL_CHANGE: Code = ("125314", "DCM", "Fractional Change")
INTERVAL: Code = ("385673002", "SCT", "Interval")
PERCENT: Code = ("%", "UCUM", "percent")
PERCENT_PER_YEAR: Code = ("%/a", "UCUM", "percent per year")
DAY: Code = ("d", "UCUM", "day")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def build_change_groups(
    comparison: Comparison,
    headers: Sequence[Dataset],
    *,
    tracking_seed: str,
    identity: Identity,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per measurement compared with the prior study.

    The tracking identifier names the prior's date, the measurement and, when the prior came
    from another model, that model; the group holds the change in the measurement's unit,
    in percent, in percent per year, and the interval in days.
    """
    prior = comparison.prior
    if prior is None:
        return []
    days = comparison.interval_days
    groups = []
    for change in comparison.changes:
        text = f"Change since prior study {prior.study_date}: {change.name}"
        if comparison.other_model:
            text += f" (prior measured with {prior.model_name} {prior.model_version})"
        unit = (change.unit, "UCUM", change.unit)
        values: list[hd.sr.Measurement] = [
            hd.sr.Measurement(name=coded(VOLUME_CHANGE), value=change.change, unit=coded(unit))
        ]
        if change.percent is not None:
            values.append(hd.sr.Measurement(name=coded(FRACTIONAL_CHANGE), value=change.percent,
                                            unit=coded(PERCENT)))
        rate = comparison.percent_per_year(change)
        if rate is not None:
            values.append(hd.sr.Measurement(name=coded(FRACTIONAL_CHANGE), value=rate,
                                            unit=coded(PERCENT_PER_YEAR)))
        if days is not None:
            values.append(hd.sr.Measurement(name=coded(INTERVAL), value=float(days), unit=coded(DAY)))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_tracking_uid(tracking_seed, "change", change.key), identifier=text
            ),
            algorithm_id=build_sr_algorithm_identification(identity),
            measurements=values,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image) for image in headers],
        ))
    return groups


def pertinent_evidence(comparison: Comparison) -> list[Dataset]:
    """The prior SR as a Hierarchical SOP Instance Reference item, or nothing."""
    prior = comparison.prior
    if prior is None or not prior.sr_sop_instance_uid or not prior.sr_series_instance_uid:
        return []
    instance = Dataset()
    instance.ReferencedSOPClassUID = COMPREHENSIVE_3D_SR
    instance.ReferencedSOPInstanceUID = prior.sr_sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = prior.sr_series_instance_uid
    series.ReferencedSOPSequence = [instance]
    study = Dataset()
    study.StudyInstanceUID = prior.study_instance_uid
    study.ReferencedSeriesSequence = [series]
    return [study]


def build_measurement_report(
    source_images: Sequence[Dataset],
    structures: Sequence[StructureLike],
    measurements: Sequence[MeasurementLike],
    findings: Sequence[FindingLike] = (),
    *,
    segmentation: Dataset | None,
    label_map: np.ndarray | None = None,
    procedure_reported: Code,
    tracking_seed: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    series_description: str,
    identity: Identity,
    quality: QualityLike | None = None,
    comparison: Comparison | None = None,
) -> Dataset:
    """Build an Imaging Measurement Report (TID 1500) as a Comprehensive 3D SR.

    Each structure gets a volumetric ROI group referring to its segment in
    `segmentation` (segment ``i + 1`` for ``structures[i]``, as
    :func:`reports.seg.build_segmentation` numbers them) with its measurements;
    measurements without a structure go into one image-level group; each finding
    gets its own group. Given the label map, a planar ROI group per structure (and
    one for the image-level group) outlines it where it is largest, tracked with the
    same UID (:func:`build_location_groups`). The report is complete but preliminary
    and unverified: a physician has not reviewed it.

    Parameters
    ----------
    source_images
        The analysed source series.
    structures
        The segmented structures, in segment order.
    measurements
        The measurements; ``structure_label`` selects the structure or ``None``.
    findings
        Classification findings.
    segmentation
        The segmentation of `structures`, or ``None`` when there are no structures.
    label_map
        The label map `segmentation` was built from, ``(slices, rows, columns)`` in the
        order of `source_images`. When given, planar ROI groups outline each structure
        (and all of them, for whole-series measurements) where it is largest, so that
        viewers can show the measurements on an image (see
        :func:`build_location_groups`).
    procedure_reported
        Code of the imaging procedure reported on (CID 100), e.g. an MR brain exam.
    tracking_seed
        Seed of the deterministic tracking UIDs, e.g. study UID, analysis and model
        version joined: a re-run then reports the same tracked entities.
    series_instance_uid, sop_instance_uid
        UIDs of the new series and instance.
    series_number, instance_number
        Series Number and Instance Number of the new instance.
    series_description
        Series Description of the new series.
    identity
        Equipment and algorithm identification.
    quality
        The analysis' judgement of its result, recorded as one more group (see
        :func:`build_quality_group`).
    comparison
        The change since the prior study: groups of :func:`build_change_groups`, and the
        prior SR in Pertinent Other Evidence.

    Returns
    -------
    pydicom.dataset.Dataset
        The report (a :class:`highdicom.sr.Comprehensive3DSR`).

    Raises
    ------
    ValueError
        If there is nothing to report, structures are given without a matching
        segmentation, a measurement names a label that no structure has, or the label
        map does not have one slice per source image.
    """
    if len(source_images) == 0:
        raise ValueError("no source images given")
    if not structures and not measurements and not findings:
        raise ValueError("nothing to report: no structures, measurements or findings")
    labels = {structure.label for structure in structures}
    stray = sorted(
        {m.structure_label for m in measurements if m.structure_label is not None} - labels
    )
    if stray:
        raise ValueError(f"measurements refer to labels {stray} that no structure has")
    if label_map is not None and label_map.shape[0] != len(source_images):
        raise ValueError(
            f"label map has {label_map.shape[0]} slices for {len(source_images)} source images"
        )
    headers = source_headers(source_images)
    evidence: list[Dataset] = list(headers)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    if structures:
        if segmentation is None:
            raise ValueError("structures given without the segmentation they refer to")
        _check_segmentation(segmentation, structures)
        evidence.append(segmentation)
        groups.extend(
            build_structure_groups(
                headers,
                structures,
                measurements,
                segmentation,
                tracking_seed=tracking_seed,
                identity=identity,
            )
        )
    image_measurements = [m for m in measurements if m.structure_label is None]
    if image_measurements:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_whole_series_tracking(tracking_seed),
                algorithm_id=build_sr_algorithm_identification(identity),
                measurements=[_measurement(m) for m in image_measurements],
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup.from_source_image(image)
                    for image in headers
                ],
            )
        )
    for finding in findings:
        groups.append(
            build_finding_group(finding, headers, tracking_seed=tracking_seed, identity=identity)
        )
    if structures and label_map is not None:
        groups.extend(
            build_location_groups(
                headers,
                structures,
                label_map,
                tracking_seed=tracking_seed,
                identity=identity,
                whole_series=bool(image_measurements),
            )
        )
    if comparison is not None:
        groups.extend(build_change_groups(comparison, headers, tracking_seed=tracking_seed, identity=identity))
    if quality is not None:
        groups.append(build_quality_group(quality, headers, tracking_seed=tracking_seed, identity=identity))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=identity.algorithm_name,
            manufacturer_name=identity.manufacturer,
            model_name=identity.manufacturer_model_name,
            serial_number=identity.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=coded(procedure_reported),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    coding_schemes = []
    if findings or (comparison is not None and comparison.changes):
        coding_schemes.append(
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=LABEL_SCHEME,
                name="dicom-node codes (classification labels, volume change)",
                responsible_organization=identity.manufacturer,
            )
        )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=identity.institution_name,
        series_description=series_description,
        manufacturer_model_name=identity.manufacturer_model_name,
        software_versions=identity.software_versions,
        device_serial_number=identity.device_serial_number,
        coding_schemes=coding_schemes or None,
    )
    copy_study_attributes(source_images[0], sr)
    if comparison is not None and pertinent_evidence(comparison):
        sr.PertinentOtherEvidenceSequence = pertinent_evidence(comparison)
    logger.info(
        "built measurement report %s: %d groups, %d measurements, %d findings",
        sop_instance_uid,
        len(groups),
        len(measurements),
        len(findings),
    )
    return sr
