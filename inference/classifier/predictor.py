"""Classify cases with a trained classifier artifact: fold ensembling, ROI rules, one JSON per case."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.classifier.dataset import (
    ArtifactError,
    ClassificationLabel,
    labels_from_json,
    list_input_cases,
)
from inference.classifier.model import I3dClassifier, roi_channels
from inference.classifier.planning import preprocess_arrays, read_case
from inference.errors import InputError

logger = logging.getLogger(__name__)

#: The weights file of a finished fold inside ``fold_N/``.
FINAL_CHECKPOINT = "checkpoint_final.pt"

Probabilities = dict[str, dict[str, float]]


def fit_to_patch(
    data: np.ndarray, roi: np.ndarray, patch: Sequence[int], rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pad (with zeros) or crop a preprocessed case to the patch size.

    Without ``rng`` the case is centred (inference); with it, the offset is random
    (training augmentation: position jitter).

    Parameters
    ----------
    data
        ``(channels, d0, d1, d2)`` normalised images.
    roi
        ``(d0, d1, d2)`` ROI label map.
    patch
        Target spatial size.
    rng
        Random generator for the offsets, or ``None`` to centre.

    Returns
    -------
    tuple of numpy.ndarray
        Data and ROI of spatial size ``patch``.
    """
    out_data = np.zeros((data.shape[0], *patch), dtype=np.float32)
    out_roi = np.zeros(tuple(patch), dtype=np.uint8)
    source: list[slice] = []
    target: list[slice] = []
    for size, want in zip(data.shape[1:], patch, strict=True):
        slack = abs(want - size)
        offset = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
        if size <= want:
            source.append(slice(0, size))
            target.append(slice(offset, offset + size))
        else:
            source.append(slice(offset, offset + want))
            target.append(slice(0, want))
    out_data[(slice(None), *target)] = data[(slice(None), *source)]
    out_roi[tuple(target)] = roi[tuple(source)]
    return out_data, out_roi


def network_input(data: np.ndarray, roi: np.ndarray, n_roi_labels: int) -> torch.Tensor:
    """Stack a batch of images ``(b, c, ...)`` and ROI maps ``(b, ...)`` into the network input."""
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    masks = roi_channels(torch.from_numpy(np.ascontiguousarray(roi)).long(), n_roi_labels)
    return torch.cat([images, masks], dim=1)


def load_fold(path: Path, device: str) -> tuple[I3dClassifier, dict[str, Any]]:
    """Load one fold's network (eval mode) and its metadata.

    Raises
    ------
    ArtifactError
        If the file is not a classifier checkpoint.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "meta"} <= checkpoint.keys():
        raise ArtifactError(f"{path}: not a classifier checkpoint (state_dict and meta)")
    meta: dict[str, Any] = dict(checkpoint["meta"])
    model = I3dClassifier(**meta["architecture"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), meta


def ensemble_probabilities(
    models: Sequence[I3dClassifier], batch: torch.Tensor, mirror_axes: Sequence[int] = ()
) -> list[np.ndarray]:
    """Mean softmax over folds (and over the mirrors of ``mirror_axes``), one array per label."""
    sums: list[torch.Tensor] | None = None
    count = 0
    with torch.inference_mode():
        for model in models:
            for flip in [None, *mirror_axes]:
                x = batch if flip is None else batch.flip(2 + int(flip))
                probs = [torch.softmax(logits.float(), dim=1) for logits in model(x)]
                sums = probs if sums is None else [s + p for s, p in zip(sums, probs, strict=True)]
                count += 1
    if sums is None:
        raise ArtifactError("no fold models to ensemble")
    return [(s / count).cpu().numpy() for s in sums]


class ClassifierPredictor:
    """A trained artifact loaded once: its plans and the networks of the chosen folds.

    Parameters
    ----------
    artifact_path
        The folder ``train`` writes (``plans.json``, ``dataset.json``, ``fold_N/``).
    folds
        Folds to ensemble; every fold with a final checkpoint when ``None``.
    device
        Torch device string.

    Raises
    ------
    ArtifactError
        If the folder lacks plans or a requested fold.
    """

    def __init__(self, artifact_path: Path, folds: Sequence[int] | None = None, device: str = "cpu") -> None:
        artifact_path = Path(artifact_path)
        plans_file = artifact_path / "plans.json"
        if not plans_file.is_file():
            raise ArtifactError(f"{artifact_path}: no plans.json: not a trained classifier folder")
        self.plans: dict[str, Any] = json.loads(plans_file.read_text(encoding="utf-8"))
        if folds is None:
            folds = sorted(
                int(p.parent.name.removeprefix("fold_")) for p in artifact_path.glob(f"fold_*/{FINAL_CHECKPOINT}")
            )
            if not folds:
                raise ArtifactError(f"{artifact_path}: no trained fold (fold_N/{FINAL_CHECKPOINT})")
        self.models: list[I3dClassifier] = []
        self.folds = list(folds)
        metas = []
        for fold in self.folds:
            path = artifact_path / f"fold_{fold}" / FINAL_CHECKPOINT
            if not path.is_file():
                raise ArtifactError(f"{artifact_path}: fold {fold} is not trained ({path.name} missing)")
            model, meta = load_fold(path, device)
            self.models.append(model)
            metas.append(meta)
        self.meta = metas[0]
        self.configuration: dict[str, Any] = self.meta["configuration"]
        self.device = device
        self.labels: tuple[ClassificationLabel, ...] = labels_from_json(self.plans["classification_labels"])
        logger.info("loaded classifier %s, folds %s, on %s", artifact_path, self.folds, device)

    @property
    def uses_roi(self) -> bool:
        """Whether the model was trained with ROI segmentations (then one is required)."""
        return bool(self.plans["uses_roi"])

    @property
    def modalities(self) -> list[str]:
        """The modality of each input image, in order."""
        return list(self.plans["modalities"])

    def check_roi(self, has_roi: bool, case_id: str) -> None:
        """Raise :class:`InputError` unless an ROI is given exactly when the model needs one."""
        if self.uses_roi and not has_roi:
            raise InputError(
                f"case {case_id}: this classifier was trained with ROI segmentations, so each case "
                "needs one (predict -s ROI_DIR with CASE.nii.gz, or roi_segmentation_file)"
            )
        if has_roi and not self.uses_roi:
            raise InputError(
                f"case {case_id}: this classifier was trained without ROI segmentations (an "
                "all-foreground mask is generated); do not pass one"
            )

    def predict_arrays(
        self, images: np.ndarray, roi: np.ndarray | None, spacing_mm: Sequence[float], case_id: str = "case"
    ) -> Probabilities:
        """Classify one case given as arrays in RAS order.

        Parameters
        ----------
        images
            ``(modalities, x, y, z)`` intensities in the closest RAS orientation.
        roi
            The ROI label map (same grid), required exactly when :attr:`uses_roi`.
        spacing_mm
            Voxel spacing in millimetres.
        case_id
            Named in error messages.

        Returns
        -------
        dict
            ``{label name: {class name: probability}}``.

        Raises
        ------
        InputError
            If the modalities or the ROI do not fit the model.
        """
        if images.ndim != 4 or images.shape[0] != len(self.modalities):
            raise InputError(
                f"case {case_id}: the model needs {len(self.modalities)} modalities "
                f"{self.modalities}, got an array of shape {images.shape}"
            )
        self.check_roi(roi is not None, case_id)
        if roi is not None and roi.shape != images.shape[1:]:
            raise InputError(f"case {case_id}: ROI shape {roi.shape} differs from the image {images.shape[1:]}")
        try:
            data, roi_pre, _ = preprocess_arrays(images, roi, spacing_mm, self.plans, case_id)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        data, roi_pre = fit_to_patch(data, roi_pre, self.configuration["patch_size"])
        batch = network_input(data[None], roi_pre[None], len(self.plans["roi_labels"]) - 1).to(self.device)
        outputs = ensemble_probabilities(self.models, batch, self.configuration.get("mirror_axes", []))
        return {
            label.name: {name: float(p) for name, p in zip(label.classes, probs[0], strict=True)}
            for label, probs in zip(self.labels, outputs, strict=True)
        }

    def predict_files(
        self, image_files: Sequence[Path], roi_file: Path | None = None, case_id: str | None = None
    ) -> Probabilities:
        """Classify one case given as NIfTI files (modality order), with its optional ROI file.

        Raises
        ------
        InputError
            If the number of files, the ROI or the geometry does not fit the model.
        """
        if case_id is None:
            case_id = Path(image_files[0]).name.removesuffix(".nii.gz").removesuffix("_0000") if image_files else "case"
        if len(image_files) != len(self.modalities):
            raise InputError(
                f"case {case_id}: the model needs {len(self.modalities)} image file(s) in the order "
                f"{self.modalities}, got {len(image_files)}"
            )
        self.check_roi(roi_file is not None, case_id)
        try:
            images, roi, spacing = read_case([Path(p) for p in image_files],
                                             Path(roi_file) if roi_file else None, case_id)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return self.predict_arrays(images, roi, spacing, case_id)


def predicted_classes(probabilities: Probabilities) -> dict[str, str]:
    """The most probable class of each label."""
    return {label: max(classes, key=lambda name: classes[name]) for label, classes in probabilities.items()}


def predict_folder(
    artifact_path: Path,
    input_dir: Path,
    output_dir: Path,
    *,
    roi_dir: Path | None = None,
    folds: Sequence[int] | None = None,
    device: str = "cpu",
) -> list[Path]:
    """Classify every case of a flat folder and write ``OUTPUT_DIR/CASE.json`` for each.

    Parameters
    ----------
    artifact_path
        The trained folder (see :class:`ClassifierPredictor`).
    input_dir
        ``CASE_XXXX.nii.gz`` files in the training naming scheme.
    output_dir
        Created if missing.
    roi_dir
        ``CASE.nii.gz`` ROI segmentations; required exactly when the model used ROIs.
    folds
        Folds to ensemble (all trained folds when ``None``).
    device
        Torch device string.

    Returns
    -------
    list of pathlib.Path
        The JSON files written.

    Raises
    ------
    InputError
        If an ROI is missing or superfluous, or a case does not fit the model.
    ArtifactError
        If the artifact is incomplete.
    """
    predictor = ClassifierPredictor(artifact_path, folds, device)
    cases = list_input_cases(input_dir, len(predictor.modalities))
    if roi_dir is not None and not roi_dir.is_dir():
        raise InputError(f"{roi_dir}: ROI folder not found")
    for case_id in cases:
        roi_file = roi_dir / f"{case_id}.nii.gz" if roi_dir is not None else None
        if roi_file is not None and not roi_file.is_file():
            raise InputError(f"case {case_id}: ROI {roi_file} is missing")
        predictor.check_roi(roi_file is not None, case_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case_id, files in cases.items():
        roi_file = roi_dir / f"{case_id}.nii.gz" if roi_dir is not None else None
        probabilities = predictor.predict_files(files, roi_file, case_id)
        result = {
            "case": case_id,
            "probabilities": probabilities,
            "predicted_class": predicted_classes(probabilities),
            "folds": predictor.folds,
            "task": predictor.plans["task"],
        }
        path = output_dir / f"{case_id}.json"
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        written.append(path)
        logger.info("case %s: %s", case_id, result["predicted_class"])
    return written
