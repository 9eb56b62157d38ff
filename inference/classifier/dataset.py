"""The classification task format (``TaskNNN_Name/`` with ``dataset.json``): read and validate it."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: A task folder name: ``Task`` + three digits + ``_`` + a name.
TASK_PATTERN = re.compile(r"^Task(\d{3})_([A-Za-z0-9][A-Za-z0-9_\-]*)$")
#: Keys of a training entry that are not classification labels.
RESERVED_KEYS = frozenset({"image", "label"})
#: Where the preprocessed data and the trained models of a task live, under the data root.
PREPROCESSED_DIR = "preprocessed"
RESULTS_DIR = "results"
#: The nnU-Net (v1) layout of the universal classifier: ``DATA/raw/nnUNet_raw_data/TaskNNN_Name``,
#: ``DATA/preprocessed/TaskNNN_Name``, ``DATA/trained_models/nnUNet/3d_fullres/TaskNNN_Name/
#: ClassifierTrainer__nnUNetPlansv2.1``.
NNUNET_RAW_DIR = Path("raw") / "nnUNet_raw_data"
NNUNET_RAW_SUBDIR = "nnUNet_raw_data"
NNUNET_RESULTS_DIR = "trained_models"
NNUNET_TRAINER_DIR = "ClassifierTrainer__nnUNetPlansv2.1"
#: Configuration names here -> the configuration folder names of the nnU-Net layout.
NNUNET_CONFIGURATIONS = {"3d": "3d_fullres"}
#: The nnU-Net (v1) environment variables: the raw-data base (holding ``nnUNet_raw_data/``),
#: the preprocessed folder and the trained-models folder.
ENV_RAW = "nnUNet_raw_data_base"
ENV_PREPROCESSED = "nnUNet_preprocessed"
ENV_RESULTS = "RESULTS_FOLDER"


class DatasetError(ValueError):
    """A task folder or its ``dataset.json`` does not follow the format.

    The message names the task, the case and the field, e.g.
    ``Task001_X/dataset.json: training[3] (case hip_004): 'volume': 2 is not one of 0, 1``.
    """


class ArtifactError(ValueError):
    """A trained-model folder is incomplete or was not written by this trainer."""


@dataclass(frozen=True)
class ClassificationLabel:
    """One classification output: its name, whether its classes are ordered, the class names.

    ``classes[k]`` is the name of class value ``k``; ``code`` is an optional coded concept
    ``(value, scheme, meaning)`` for reports.
    """

    name: str
    ordinal: bool
    classes: tuple[str, ...]
    code: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class Case:
    """One case: its modality files in modality order, its optional ROI and its targets."""

    case_id: str
    image_files: tuple[Path, ...]
    roi_file: Path | None = None
    targets: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskDataset:
    """A validated task: everything ``dataset.json`` says, with resolved file paths."""

    task_dir: Path
    task_id: int
    name: str
    description: str
    modalities: tuple[str, ...]
    classification_labels: tuple[ClassificationLabel, ...]
    roi_labels: dict[int, str] | None
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    raw: dict[str, Any]

    @property
    def uses_roi(self) -> bool:
        """Whether the training cases come with ROI segmentations."""
        return any(case.roi_file is not None for case in self.training)


@dataclass(frozen=True)
class TaskRoots:
    """The three folders of a data root: raw tasks, preprocessed tasks, trained models.

    ``nnunet`` says whether trained models are filed as the nnU-Net layout files them
    (``nnUNet/3d_fullres/TaskNNN_Name/ClassifierTrainer__nnUNetPlansv2.1``) or as
    ``TaskNNN_Name/3d``.
    """

    raw: Path
    preprocessed: Path
    results: Path
    nnunet: bool


def task_roots(data_root: Path | TaskRoots, environ: Mapping[str, str] | None = None) -> TaskRoots:
    """Resolve the folders of a data root in either layout, with the nnU-Net variables if given.

    ``DATA/raw/nnUNet_raw_data/`` present means the nnU-Net layout (``raw/nnUNet_raw_data``,
    ``preprocessed``, ``trained_models``); otherwise the tasks lie in ``DATA`` itself with
    ``DATA/preprocessed`` and ``DATA/results``. Each of ``nnUNet_raw_data_base``,
    ``nnUNet_preprocessed`` and ``RESULTS_FOLDER`` set in ``environ`` replaces its folder
    (and selects the nnU-Net filing of trained models).

    Parameters
    ----------
    data_root
        The data root, or roots already resolved (returned unchanged).
    environ
        The environment to read the nnU-Net variables from; ``None`` reads none.

    Returns
    -------
    TaskRoots
        The resolved folders.
    """
    if isinstance(data_root, TaskRoots):
        return data_root
    env = {key: value for key, value in (environ or {}).items()
           if key in (ENV_RAW, ENV_PREPROCESSED, ENV_RESULTS) and value}
    nnunet = (data_root / NNUNET_RAW_DIR).is_dir() or bool(env)
    if nnunet:
        roots = TaskRoots(data_root / NNUNET_RAW_DIR, data_root / PREPROCESSED_DIR,
                          data_root / NNUNET_RESULTS_DIR, True)
    else:
        roots = TaskRoots(data_root, data_root / PREPROCESSED_DIR, data_root / RESULTS_DIR, False)
    return TaskRoots(
        raw=Path(env[ENV_RAW]) / NNUNET_RAW_SUBDIR if ENV_RAW in env else roots.raw,
        preprocessed=Path(env[ENV_PREPROCESSED]) if ENV_PREPROCESSED in env else roots.preprocessed,
        results=Path(env[ENV_RESULTS]) if ENV_RESULTS in env else roots.results,
        nnunet=nnunet,
    )


def task_name(task_dir: Path) -> str:
    """Return the folder name ``TaskNNN_Name`` of a task directory."""
    return task_dir.name


def find_task_dir(data_root: Path | TaskRoots, task: str | int) -> Path:
    """Find the raw folder of a task by id (``1``, ``"001"``) or full name.

    Parameters
    ----------
    data_root
        The data root (either layout, see :func:`task_roots`) or its resolved roots.
    task
        The task id or the full folder name.

    Returns
    -------
    pathlib.Path
        The task folder.

    Raises
    ------
    DatasetError
        If no folder or several folders match.
    """
    raw = task_roots(data_root).raw
    text = str(task)
    if TASK_PATTERN.match(text):
        candidates = [raw / text] if (raw / text).is_dir() else []
    else:
        if not text.isdigit():
            raise DatasetError(f"task {text!r}: give a task id (e.g. 1 or 001) or TaskNNN_Name")
        prefix = f"Task{int(text):03d}_"
        candidates = sorted(
            path for path in raw.glob(f"{prefix}*")
            if path.is_dir() and TASK_PATTERN.match(path.name)
        )
    if not candidates:
        raise DatasetError(f"{raw}: no task folder for task {text!r} (TaskNNN_Name)")
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise DatasetError(f"{raw}: several folders for task {text!r}: {names}")
    return candidates[0]


def preprocessed_dir(data_root: Path | TaskRoots, task_dir_name: str) -> Path:
    """Where ``plan-and-preprocess`` writes a task's plans and arrays."""
    return task_roots(data_root).preprocessed / task_dir_name


def results_dir(data_root: Path | TaskRoots, task_dir_name: str, configuration: str) -> Path:
    """The artifact folder of a task trained in one configuration (one sub-folder per fold)."""
    roots = task_roots(data_root)
    if roots.nnunet:
        folder = NNUNET_CONFIGURATIONS.get(configuration, configuration)
        return roots.results / "nnUNet" / folder / task_dir_name / NNUNET_TRAINER_DIR
    return roots.results / task_dir_name / configuration


def modality_files(folder: Path, case_id: str, n_modalities: int) -> tuple[Path, ...]:
    """Return ``case_0000.nii.gz`` ... for a case, in modality order (existence unchecked)."""
    return tuple(folder / f"{case_id}_{index:04d}.nii.gz" for index in range(n_modalities))


def list_input_cases(folder: Path, n_modalities: int) -> dict[str, tuple[Path, ...]]:
    """Group a flat folder of ``case_XXXX.nii.gz`` files into complete cases.

    Parameters
    ----------
    folder
        The input folder.
    n_modalities
        How many modalities each case must have.

    Returns
    -------
    dict
        ``{case_id: (modality 0 file, ...)}``, sorted by case id.

    Raises
    ------
    DatasetError
        If the folder holds no case, a file is misnamed or a case lacks a modality.
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    found: dict[str, set[int]] = {}
    for path in sorted(folder.glob("*.nii.gz")):
        match = re.match(r"^(.+)_(\d{4})\.nii\.gz$", path.name)
        if match is None:
            raise DatasetError(
                f"{path}: expected CASE_XXXX.nii.gz with a four-digit modality index"
            )
        found.setdefault(match.group(1), set()).add(int(match.group(2)))
    if not found:
        raise DatasetError(f"{folder}: no CASE_XXXX.nii.gz images")
    expected = set(range(n_modalities))
    for case_id, indices in found.items():
        if indices != expected:
            raise DatasetError(
                f"{folder}: case {case_id}: has modalities {sorted(indices)}, the model "
                f"needs exactly {sorted(expected)}"
            )
    return {case_id: modality_files(folder, case_id, n_modalities) for case_id in sorted(found)}


def _require(mapping: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DatasetError(f"{where}: field {key!r} must be a {kind.__name__}, not {value!r}")
    return value


def _consecutive_keys(mapping: dict[str, Any], where: str, key: str) -> list[int]:
    try:
        values = sorted(int(k) for k in mapping)
    except ValueError:
        raise DatasetError(f"{where}: field {key!r}: keys must be integers, not {list(mapping)}") from None
    if values != list(range(len(values))):
        raise DatasetError(f"{where}: field {key!r}: keys must be consecutive from 0, not {values}")
    return values


def _parse_labels(raw: list[Any], where: str) -> tuple[ClassificationLabel, ...]:
    if not raw:
        raise DatasetError(f"{where}: field 'classification_labels' is empty")
    labels = []
    for index, entry in enumerate(raw):
        here = f"{where}: classification_labels[{index}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{here}: must be an object with name, values and optionally ordinal")
        name = _require(entry, "name", str, here)
        if name in RESERVED_KEYS or not name:
            raise DatasetError(f"{here}: field 'name': {name!r} is reserved or empty")
        # the AUC23 format has ``ordinal``, but its reference implementation ignores it: optional here
        ordinal = _require(entry, "ordinal", bool, here) if "ordinal" in entry else False
        values = _require(entry, "values", dict, here)
        keys = _consecutive_keys(values, here, "values")
        if len(keys) < 2:
            raise DatasetError(f"{here}: field 'values': a label needs at least two classes")
        classes = tuple(str(values[str(k)]) for k in keys)
        code = entry.get("code")
        if code is not None and not (
            isinstance(code, list) and len(code) == 3 and all(isinstance(c, str) for c in code)
        ):
            raise DatasetError(f"{here}: field 'code' must be [value, scheme, meaning]")
        labels.append(
            ClassificationLabel(name, ordinal, classes, (code[0], code[1], code[2]) if code else None)
        )
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        raise DatasetError(f"{where}: field 'classification_labels': duplicate names {names}")
    return tuple(labels)


def _case_id(image: str, subfolder: str, where: str) -> str:
    match = re.match(rf"^(?:\./)?{subfolder}/(.+)\.nii\.gz$", image)
    if match is None or "/" in match.group(1):
        raise DatasetError(f"{where}: field 'image': expected ./{subfolder}/CASE.nii.gz, not {image!r}")
    return match.group(1)


def _parse_case(
    entry: Any,
    index: int,
    section: str,
    task_dir: Path,
    dataset: dict[str, Any],
    labels: tuple[ClassificationLabel, ...],
    where: str,
) -> Case:
    images_dir, labels_dir = ("imagesTr", "labelsTr") if section == "training" else ("imagesTs", "labelsTs")
    here = f"{where}: {section}[{index}]"
    if isinstance(entry, str) and section == "test":
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise DatasetError(f"{here}: must be an object with 'image' and the label values")
    case_id = _case_id(_require(entry, "image", str, here), images_dir, here)
    here = f"{here} (case {case_id})"
    files = modality_files(task_dir / images_dir, case_id, len(dataset["modality"]))
    for path in files:
        if not path.is_file():
            raise DatasetError(f"{here}: field 'image': file {images_dir}/{path.name} is missing")
    roi_file = None
    if "label" in entry:
        roi = _require(entry, "label", str, here)
        expected = {f"./{labels_dir}/{case_id}.nii.gz", f"{labels_dir}/{case_id}.nii.gz"}
        if roi not in expected:
            raise DatasetError(f"{here}: field 'label': expected ./{labels_dir}/{case_id}.nii.gz, not {roi!r}")
        roi_file = task_dir / labels_dir / f"{case_id}.nii.gz"
        if not roi_file.is_file():
            raise DatasetError(f"{here}: field 'label': file {labels_dir}/{case_id}.nii.gz is missing")
    targets: dict[str, int] = {}
    for label in labels:
        if label.name not in entry:
            if section == "training":
                raise DatasetError(f"{here}: missing field {label.name!r}")
            continue
        value = entry[label.name]
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(label.classes):
            allowed = ", ".join(str(k) for k in range(len(label.classes)))
            raise DatasetError(f"{here}: field {label.name!r}: {value!r} is not one of {allowed}")
        targets[label.name] = value
    unknown = set(entry) - RESERVED_KEYS - {label.name for label in labels}
    if unknown:
        raise DatasetError(f"{here}: unknown field(s) {sorted(unknown)} (not a classification label)")
    return Case(case_id, files, roi_file, targets)


def load_dataset(task_dir: Path) -> TaskDataset:
    """Read and validate a task folder's ``dataset.json`` against the files on disk.

    Parameters
    ----------
    task_dir
        ``.../TaskNNN_Name``.

    Returns
    -------
    TaskDataset
        The validated task.

    Raises
    ------
    DatasetError
        On any deviation from the format; the message names the case and the field.
    """
    match = TASK_PATTERN.match(task_dir.name)
    if match is None:
        raise DatasetError(f"{task_dir}: a task folder is named TaskNNN_Name (three-digit id)")
    where = f"{task_dir.name}/dataset.json"
    try:
        raw = json.loads((task_dir / "dataset.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{where}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: must be a JSON object")
    name = _require(raw, "name", str, where)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise DatasetError(f"{where}: field 'description' must be a str")
    modality = _require(raw, "modality", dict, where)
    if not modality:
        raise DatasetError(f"{where}: field 'modality' is empty")
    modalities = tuple(str(modality[str(k)]) for k in _consecutive_keys(modality, where, "modality"))
    labels = _parse_labels(_require(raw, "classification_labels", list, where), where)
    roi_labels: dict[int, str] | None = None
    if "labels" in raw:
        roi_raw = _require(raw, "labels", dict, where)
        keys = _consecutive_keys(roi_raw, where, "labels")
        if len(keys) < 2:
            raise DatasetError(f"{where}: field 'labels': needs background (0) and at least one ROI label")
        roi_labels = {k: str(roi_raw[str(k)]) for k in keys}
    training_raw = _require(raw, "training", list, where)
    if not training_raw:
        raise DatasetError(f"{where}: field 'training' is empty")
    training = tuple(
        _parse_case(entry, i, "training", task_dir, raw, labels, where) for i, entry in enumerate(training_raw)
    )
    test_raw = raw.get("test", [])
    if not isinstance(test_raw, list):
        raise DatasetError(f"{where}: field 'test' must be a list")
    test = tuple(_parse_case(entry, i, "test", task_dir, raw, labels, where) for i, entry in enumerate(test_raw))
    ids = [case.case_id for case in training]
    duplicates = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if duplicates:
        raise DatasetError(f"{where}: field 'training': duplicate case(s) {duplicates}")
    with_roi = [case.roi_file is not None for case in training]
    if any(with_roi) and not all(with_roi):
        missing = next(case.case_id for case in training if case.roi_file is None)
        raise DatasetError(
            f"{where}: training (case {missing}): field 'label' missing; give an ROI for every "
            "training case or for none"
        )
    if any(with_roi) and roi_labels is None:
        raise DatasetError(f"{where}: missing field 'labels' (names of the ROI label values)")
    for label in labels:
        counts = {case.targets[label.name] for case in training}
        if len(counts) < 2:
            raise DatasetError(
                f"{where}: classification label {label.name!r}: every training case has the same value"
            )
    logger.info("task %s: %d training, %d test cases", task_dir.name, len(training), len(test))
    return TaskDataset(
        task_dir=task_dir,
        task_id=int(match.group(1)),
        name=name,
        description=description,
        modalities=modalities,
        classification_labels=labels,
        roi_labels=roi_labels,
        training=training,
        test=test,
        raw=raw,
    )


def labels_to_json(labels: tuple[ClassificationLabel, ...]) -> list[dict[str, Any]]:
    """Write classification labels back in the ``dataset.json`` form."""
    return [
        {"name": label.name, "ordinal": label.ordinal,
         "values": {str(k): name for k, name in enumerate(label.classes)}}
        | ({"code": list(label.code)} if label.code else {})
        for label in labels
    ]


def labels_from_json(raw: list[dict[str, Any]]) -> tuple[ClassificationLabel, ...]:
    """Read classification labels saved by :func:`labels_to_json` (already validated)."""
    return _parse_labels(raw, "classification_labels")
