"""Build a derived image series (new pixels over a template series' geometry) in the source study."""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from reports.identity import STUDY_ATTRIBUTES, Identity, copy_study_attributes

logger = logging.getLogger(__name__)

#: PS3.16 CID 7202: "Source image for image processing operation".
SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")

#: Attributes of the template that would be wrong in the derived image: identifiers, pixel
#: statistics, derivation and equipment (the node made these images, not the scanner).
_REPLACED = frozenset({
    "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ImageType",
    "DerivationDescription", "DerivationCodeSequence", "SourceImageSequence",
    "SmallestImagePixelValue", "LargestImagePixelValue", "IconImageSequence", "PixelData",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName",
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
    "SeriesDate", "SeriesTime", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
    *STUDY_ATTRIBUTES,
})


#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1), written
#: empty when the source lacks them (anonymised studies often do).
_TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def encode_pixels(values: np.ndarray, template: Dataset) -> np.ndarray:
    """Return ``values`` (modality units) as the template's stored pixel values.

    The template's RescaleSlope/RescaleIntercept are kept, so stored values are
    ``round((value - intercept) / slope)``, clipped to what BitsStored and
    PixelRepresentation can hold.

    Raises
    ------
    ValueError
        If the template is not a single-sample greyscale image of 8, 16 or 32 bits.
    """
    if int(template.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("derived series need a greyscale template (SamplesPerPixel 1)")
    bits = int(template.BitsAllocated)
    if bits not in (8, 16, 32):
        raise ValueError(f"BitsAllocated {bits} is not 8, 16 or 32")
    signed = int(template.get("PixelRepresentation", 0)) == 1
    stored_bits = int(template.get("BitsStored", bits))
    low, high = (-(2 ** (stored_bits - 1)), 2 ** (stored_bits - 1) - 1) if signed else (0, 2**stored_bits - 1)
    slope = float(template.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(template.get("RescaleIntercept", 0.0) or 0.0)
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    return np.clip(stored, low, high).astype(dtype)


def build_derived_series(
    sources: Sequence[Dataset],
    image: np.ndarray,
    *,
    series_instance_uid: str,
    sop_instance_uids: Sequence[str],
    series_number: int,
    series_description: str,
    derivation_description: str,
    identity: Identity,
) -> list[Dataset]:
    """Build one derived image per source image: same geometry and rescale, new pixels.

    Parameters
    ----------
    sources
        The template series, one dataset per slice, in the order of ``image``'s first axis.
    image
        New pixel values in the modality's units (after rescale), shape
        ``(len(sources), Rows, Columns)``.
    series_instance_uid, sop_instance_uids
        UIDs of the new series and of each new image.
    series_number, series_description
        Of the new series.
    derivation_description
        What was done, in words (Derivation Description).
    identity
        Equipment that made the images.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        Explicit VR Little Endian images with ImageType DERIVED\\SECONDARY, referencing
        their source image, with patient and study attributes copied from the source.

    Raises
    ------
    ValueError
        If shapes or counts do not match, or a template is not greyscale.
    """
    if image.ndim != 3 or image.shape[0] != len(sources) or len(sop_instance_uids) != len(sources):
        raise ValueError(
            f"image shape {image.shape} does not fit {len(sources)} sources and "
            f"{len(sop_instance_uids)} SOP Instance UIDs"
        )
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    derived = []
    for index, (source, sop_uid) in enumerate(zip(sources, sop_instance_uids, strict=True)):
        if image.shape[1:] != (int(source.Rows), int(source.Columns)):
            raise ValueError(f"slice {index}: image is {image.shape[1:]}, source is {source.Rows}x{source.Columns}")
        ds = Dataset()
        for element in source:
            if element.tag.is_private or element.keyword in _REPLACED or element.tag.group == 0x0002:
                continue
            ds.add(copy.deepcopy(element))
        copy_study_attributes(source, ds)
        for keyword in _TYPE2_EMPTY:
            if keyword not in ds:
                setattr(ds, keyword, None)
        source_type = list(source.get("ImageType", []))
        ds.ImageType = ["DERIVED", "SECONDARY", *source_type[2:]]
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_instance_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description[:64]
        ds.InstanceNumber = index + 1
        ds.DerivationDescription = derivation_description[:1024]
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_FOR_PROCESSING
        reference.PurposeOfReferenceCodeSequence = [purpose]
        ds.SourceImageSequence = [reference]
        ds.Manufacturer = identity.manufacturer
        ds.ManufacturerModelName = identity.manufacturer_model_name
        ds.SoftwareVersions = identity.software_versions
        ds.DeviceSerialNumber = identity.device_serial_number
        if identity.institution_name:
            ds.InstitutionName = identity.institution_name
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        ds.PixelData = encode_pixels(image[index], source).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = source.SOPClassUID
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        derived.append(ds)
    logger.debug("built derived series %s (%d images)", series_instance_uid, len(derived))
    return derived
