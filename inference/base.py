"""The analysis plugin interface and the result model every analysis returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

# Re-exported: analysis plugins outside this repository raise it as inference.base.InputError.
from inference.errors import InputError as InputError

if TYPE_CHECKING:
    from inference.volume import Volume

#: A coded concept as plain data: (code value, coding scheme designator, code meaning).
Code = tuple[str, str, str]


@dataclass(frozen=True)
class SeriesCandidate:
    """What a choice between several usable series of one study may look at.

    Parameters
    ----------
    series_uid
        SeriesInstanceUID.
    kernel
        ConvolutionKernel, values joined by backslashes ('' when absent).
    slice_thickness_mm
        SliceThickness, or ``None``.
    slice_count
        Number of images.
    """

    series_uid: str
    kernel: str
    slice_thickness_mm: float | None
    slice_count: int


def join_values(value: object) -> str:
    """Return a text attribute's value as one string, several values joined by backslashes.

    This is how :attr:`SeriesCandidate.kernel` holds a multi-valued ConvolutionKernel, and
    how DICOM itself encodes several values of a string (PS3.5 6.4).

    Parameters
    ----------
    value
        The value as pydicom gives it: ``None``, a string, or several values (a
        ``pydicom.multival.MultiValue`` or a list).

    Returns
    -------
    str
        ``""`` for ``None``, the string itself, or the values joined by backslashes.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        return "\\".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class SeriesRule:
    """Which series an analysis can use, as rules over DICOM attributes.

    Parameters
    ----------
    modalities
        Accepted values of Modality, e.g. ``("MR",)``.
    description_pattern
        A regular expression searched (case-insensitively) in SeriesDescription; ``None``
        accepts any description.
    min_slices, max_slices
        Bounds on the number of images in the series; ``min_slices=None`` means the node's
        configured default minimum.
    orientation
        ``"axial"``, ``"sagittal"``, ``"coronal"`` or ``"any"``; judged from
        ImageOrientationPatient.
    max_spacing_mm
        Largest acceptable pixel spacing or slice spacing in millimetres, or ``None``.
    max_matrix
        Largest acceptable Rows and Columns, or ``None``.
    choose
        When set and several series of a study satisfy the rule, only the one this function
        returns is analysed (the others are reported as passed over); ``None`` analyses all.
    """

    modalities: tuple[str, ...]
    description_pattern: str | None = None
    min_slices: int | None = None
    max_slices: int | None = None
    orientation: str = "any"
    max_spacing_mm: float | None = None
    max_matrix: int | None = None
    choose: Callable[[Sequence[SeriesCandidate]], SeriesCandidate] | None = None


@dataclass(frozen=True)
class Structure:
    """One segmented structure: its value in the label map and how it is coded."""

    label: int
    name: str
    category: Code
    property_type: Code
    colour_rgb: tuple[int, int, int]
    laterality: Code | None = None


@dataclass(frozen=True)
class Measurement:
    """One measured value, with its unit as a UCUM code.

    ``structure_label`` names the :class:`Structure` it was measured on, or ``None`` for
    a measurement of the whole image (for example a total over several structures).
    """

    name: str
    concept: Code
    value: float
    unit: Code
    structure_label: int | None = None


@dataclass(frozen=True)
class Finding:
    """A classification output: a coded finding with a probability per class."""

    name: str
    concept: Code
    predicted_class: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Quality:
    """How far the model itself trusts one result.

    Parameters
    ----------
    low_confidence
        ``True`` when any check fell outside its limit; reports show it prominently.
    reasons
        One sentence per failed check, e.g. ``"image and mirror disagree (Dice 0.41 < 0.80)"``;
        empty when ``low_confidence`` is ``False``.
    checks
        The value of every check, by name (``{"mirror_agreement_dice": 0.97, ...}``).
    derivation
        How the limits were derived (data and rule), so a reader can judge them.
    """

    low_confidence: bool
    reasons: tuple[str, ...] = ()
    checks: dict[str, float] = field(default_factory=dict)
    derivation: str = ""

    def __post_init__(self) -> None:
        if self.low_confidence != bool(self.reasons):
            raise ValueError("a low-confidence result needs reasons, and only it has them")


@dataclass(frozen=True)
class AnalysisResult:
    """What an analysis returns for one series.

    ``title`` names the analysis for people ("Hippocampus volumetry"); it heads the report
    and the result series' descriptions. ``method`` says which path produced the result.
    ``label_map`` (uint8) is in the source series' array order, shape
    ``(n_slices, rows, columns)``, slices in the order of :attr:`Volume.sop_instance_uids`,
    so that frame ``k`` of a segmentation refers to source image ``k``.

    A processing task returns an image instead: ``derived_image`` (float, in the modality's
    units, same shape and order as ``label_map`` would have) becomes a derived series over
    the source geometry, described by ``derived_description`` ("Gaussian blur, sigma 2 mm").

    ``quality``, when the analysis can judge its own result, flags a low-confidence result
    (see :class:`Quality`); ``None`` means the analysis makes no such judgement.

    ``side`` is ``"left"``, ``"right"`` or ``"unknown"`` (with ``side_reason``) for an analysis
    of one side of a paired structure, judged from the series' geometry; ``None`` otherwise.
    """

    analysis: str
    title: str
    model_name: str
    model_version: str
    method: str
    structures: tuple[Structure, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    findings: tuple[Finding, ...] = ()
    label_map: np.ndarray | None = None
    key_slices: tuple[int, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)
    derived_image: np.ndarray | None = None
    derived_description: str = ""
    quality: Quality | None = None
    side: str | None = None
    side_reason: str = ""

    def __post_init__(self) -> None:
        if self.derived_image is not None and self.derived_image.ndim != 3:
            raise ValueError(f"derived_image must be 3D, not {self.derived_image.ndim}D")
        if self.side not in (None, "left", "right", "unknown"):
            raise ValueError(f"side must be left, right or unknown, not {self.side!r}")
        if self.derived_image is not None and not self.derived_description:
            raise ValueError("a derived image needs a description of what was done")


@runtime_checkable
class Analysis(Protocol):
    """An analysis plugin. The node knows nothing model-specific beyond this interface.

    ``load`` is called once per worker process with an explicit device (``"cpu"`` or
    ``"cuda:N"``); ``run`` is then called once per selected series.

    An analysis whose results are worth following over time sets the class attribute
    ``uses_prior_results = True``: the node then finds the patient's earlier results of it (in
    its ledger and the PACS) and the reports show the change since them. ``run`` never sees
    them: the comparison is made by the node's report step.
    """

    name: str
    model_name: str
    model_version: str
    rule: SeriesRule

    def load(self, device: str) -> None: ...

    def run(self, volume: Volume) -> AnalysisResult: ...


@dataclass(frozen=True)
class WarmUpInput:
    """A synthetic series like those an analysis sees, run once by each worker while loading.

    The first call of a model pays for lazy initialisation (kernel selection and compilation
    for the input's shape, allocator growth, imports); a worker runs every analysis once on
    this input, and builds its reports, before it says it is ready.

    Parameters
    ----------
    modality
        Modality of the synthetic images, e.g. ``"MR"``.
    shape
        ``(slices, rows, columns)``; close to real inputs, since compiled kernels depend on it.
    spacing_mm
        Slice, row and column spacing in millimetres.
    description
        SeriesDescription of the synthetic series.
    image
        The voxels in modality units (CT: HU), axes (inferior to superior, anterior to
        posterior, right to left) and of ``shape``, for an analysis that needs anatomy to run
        its real path (a spine to find a level in); by default an ellipsoid over faint noise.
    """

    modality: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    description: str = "warm-up"
    image: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, not {self.shape}")
        if self.image is not None and self.image.shape != tuple(self.shape):
            raise ValueError(f"image has shape {self.image.shape}, not {self.shape}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be three positive values, not {self.spacing_mm}")


@runtime_checkable
class WarmsUp(Protocol):
    """An analysis that chooses its own warm-up input (``None``: do not warm it up)."""

    def warm_up_input(self) -> WarmUpInput | None: ...


def warm_up_input(analysis: Analysis) -> WarmUpInput | None:
    """Return the synthetic input a worker runs ``analysis`` on while loading.

    An analysis may choose it (:class:`WarmsUp`); by default it is a series its rule
    accepts: the first modality, the rule's minimum slice count (at least 20) and a
    matrix of 64, or the rule's maximum matrix when smaller, at 1 mm.
    """
    if isinstance(analysis, WarmsUp):
        return analysis.warm_up_input()
    rule = analysis.rule
    slices = max(rule.min_slices or 20, 20)
    if rule.max_slices is not None:
        slices = min(slices, rule.max_slices)
    matrix = min(64, rule.max_matrix or 64)
    return WarmUpInput(rule.modalities[0], (slices, matrix, matrix))


@runtime_checkable
class ConfigurableAnalysis(Analysis, Protocol):
    """An analysis that takes per-job options (``POST /jobs`` ``options``), e.g. a blur's sigma.

    ``validate_options`` runs in the node before a job is accepted and returns the options
    completed with defaults; it raises ``ValueError`` whose message starts with the option's
    name (``"sigma_mm: must be positive"``). ``run_with_options`` then runs with them.
    """

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]: ...

    def run_with_options(self, volume: Volume, options: dict[str, Any]) -> AnalysisResult: ...
