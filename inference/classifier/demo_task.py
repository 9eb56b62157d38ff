"""Build the demonstration classification tasks from the MSD hippocampus crops and their segmentations."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from inference.classifier.dataset import DatasetError, load_dataset

logger = logging.getLogger(__name__)

# nibabel has no type annotations: calls through Any keep mypy --strict quiet.
_nib: Any = nib

ATTRIBUTION = (
    "Images and segmentations: Medical Segmentation Decathlon Task04 Hippocampus, CC-BY-SA 4.0. "
    "Simpson et al., 'A large annotated medical image dataset for the development and evaluation "
    "of segmentation algorithms', 2019. Classification labels derived by dicom-node."
)
DESCRIPTION = (
    "DEMONSTRATION TASK, not a clinical question. T1 MR hippocampus crops (MSD Task04). "
    "Label 'hippocampus_volume': is the manually segmented hippocampus volume (anterior + "
    "posterior) above the median of the included cases? Label 'posterior_anterior_ratio': is "
    "the posterior/anterior volume ratio above its median? Both are derived from the MSD "
    "segmentations, so they are real properties of each image. "
)
#: Every tenth case (sorted order, index % 10 == 9) goes to imagesTs/labelsTs.
TEST_EVERY = 10


def _volumes(label_file: Path) -> tuple[float, float]:
    """Anterior (1) and posterior (2) volumes in mm³ of an MSD label map."""
    nii: Any = _nib.load(label_file)
    labels = np.asarray(nii.dataobj)
    voxel_mm3 = float(np.prod(nii.header.get_zooms()[:3]))
    return float(np.sum(labels == 1)) * voxel_mm3, float(np.sum(labels == 2)) * voxel_mm3


def _write_roi(label_file: Path, out: Path) -> None:
    """Merge anterior and posterior into one whole-hippocampus ROI (value 1)."""
    nii: Any = _nib.load(label_file)
    roi = (np.asarray(nii.dataobj) > 0).astype(np.uint8)
    image = _nib.Nifti1Image(roi, nii.affine, nii.header)
    image.set_data_dtype(np.uint8)
    _nib.save(image, out)


def build_demo_task(
    source: Path,
    data_root: Path,
    *,
    task_id: int = 1,
    with_roi: bool = True,
    max_cases: int | None = None,
) -> Path:
    """Write ``TaskNNN_HippocampusVolume`` (or ``...NoROI``) under ``data_root`` from the MSD crops.

    Parameters
    ----------
    source
        The MSD hippocampus folder with ``images/`` and ``labels/`` (``../shared/data/hippocampus-msd``).
    data_root
        The raw-data root to write the task into; an existing task folder is replaced.
    task_id
        The three-digit task id.
    with_roi
        Ship the whole-hippocampus mask as ROI (``labelsTr``); without it the planner generates
        an all-foreground mask and the model must find the hippocampus itself.
    max_cases
        Use only the first N cases in sorted order (tests); medians are over the cases used.

    Returns
    -------
    pathlib.Path
        The task folder (validated).

    Raises
    ------
    FileNotFoundError
        If ``source`` holds no image/label pairs.
    ValueError
        If ``task_id`` is not 1-999.
    """
    if not 1 <= task_id <= 999:
        raise ValueError(f"task_id must be 1-999, not {task_id}")
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (source / "images").glob("*.nii.gz")
                   if (source / "labels" / p.name).is_file())
    if max_cases is not None:
        cases = cases[:max_cases]
    if len(cases) < 2:
        raise FileNotFoundError(f"{source}: fewer than two image/label pairs under images/ and labels/")
    volumes = {case: _volumes(source / "labels" / f"{case}.nii.gz") for case in cases}
    totals = {case: a + p for case, (a, p) in volumes.items()}
    ratios = {case: p / max(a, 1.0) for case, (a, p) in volumes.items()}
    median_total = float(np.median(list(totals.values())))
    median_ratio = float(np.median(list(ratios.values())))
    name = f"Task{task_id:03d}_HippocampusVolume{'' if with_roi else 'NoROI'}"
    task_dir = data_root / name
    if task_dir.exists():
        shutil.rmtree(task_dir)
    folders = ["imagesTr", "imagesTs"] + (["labelsTr", "labelsTs"] if with_roi else [])
    for folder in folders:
        (task_dir / folder).mkdir(parents=True)
    training: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for index, case in enumerate(cases):
        part = "Ts" if index % TEST_EVERY == TEST_EVERY - 1 else "Tr"
        shutil.copyfile(source / "images" / f"{case}.nii.gz", task_dir / f"images{part}" / f"{case}_0000.nii.gz")
        entry: dict[str, Any] = {
            "image": f"./images{part}/{case}.nii.gz",
            "hippocampus_volume": int(totals[case] > median_total),
            "posterior_anterior_ratio": int(ratios[case] > median_ratio),
        }
        if with_roi:
            _write_roi(source / "labels" / f"{case}.nii.gz", task_dir / f"labels{part}" / f"{case}.nii.gz")
            entry["label"] = f"./labels{part}/{case}.nii.gz"
        (training if part == "Tr" else test).append(entry)
    dataset: dict[str, Any] = {
        "name": name.split("_", 1)[1],
        "description": DESCRIPTION + f"Medians over the {len(cases)} cases: volume {median_total:.1f} mm3, "
        f"ratio {median_ratio:.4f}. " + ("ROI: whole hippocampus mask." if with_roi else "No ROI."),
        "reference": ATTRIBUTION,
        "licence": "CC-BY-SA 4.0",
        "modality": {"0": "MR"},
        "classification_labels": [
            {"name": "hippocampus_volume", "ordinal": False,
             "values": {"0": "at or below median", "1": "above median"}},
            {"name": "posterior_anterior_ratio", "ordinal": False,
             "values": {"0": "at or below median", "1": "above median"}},
        ],
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    if with_roi:
        dataset["labels"] = {"0": "background", "1": "hippocampus"}
    (task_dir / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    (task_dir / "README.md").write_text(
        f"# {name}: a demonstration task\n\n{DESCRIPTION}\n\n{ATTRIBUTION}\n", encoding="utf-8"
    )
    try:
        load_dataset(task_dir)
    except DatasetError:
        logger.error("the demo task builder wrote an invalid task at %s", task_dir)
        raise
    logger.info("wrote %s: %d training, %d test cases", task_dir, len(training), len(test))
    return task_dir
