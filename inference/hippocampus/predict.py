"""Hippocampus segmentation with the trained U-Net: normalise, predict, score against labels."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from inference.hippocampus.model import UNet3d

logger = logging.getLogger(__name__)

#: Label values of the map :meth:`HippocampusSegmenter.segment` returns.
LABEL_NAMES: dict[int, str] = {1: "anterior", 2: "posterior"}

#: How :func:`normalise` scales an image; recorded in the weights metadata.
NORMALISATION = (
    "per-case z-score over all voxels of the crop: (x - mean) / max(std, 1e-8), float32"
)


def normalise(image: np.ndarray) -> np.ndarray:
    """Z-score an image over all of its voxels.

    The MSD crops contain tissue everywhere (there is no zero background), so every voxel
    counts.

    Parameters
    ----------
    image
        A 3D intensity array.

    Returns
    -------
    numpy.ndarray
        A float32 array of the same shape with mean 0 and standard deviation 1.
    """
    data = np.asarray(image, dtype=np.float32)
    std = max(float(data.std()), 1e-8)
    return ((data - float(data.mean())) / std).astype(np.float32)


def list_cases(data_dir: Path) -> list[str]:
    """Return the sorted case ids (``hippocampus_NNN``) that have both an image and a label.

    Parameters
    ----------
    data_dir
        The dataset folder with ``images/`` and ``labels/``.

    Returns
    -------
    list of str
        Case ids in sorted order.

    Raises
    ------
    FileNotFoundError
        If the folder holds no complete case.
    """
    cases = sorted(
        path.name.removesuffix(".nii.gz")
        for path in (data_dir / "images").glob("*.nii.gz")
        if (data_dir / "labels" / path.name).is_file()
    )
    if not cases:
        raise FileNotFoundError(f"no image/label pairs under {data_dir}")
    return cases


def load_case(data_dir: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one MSD case in RAS array order.

    Parameters
    ----------
    data_dir
        The dataset folder with ``images/`` and ``labels/``.
    case_id
        For example ``"hippocampus_001"``.

    Returns
    -------
    tuple of numpy.ndarray
        The float32 image and the uint8 label map, same shape.

    Raises
    ------
    ValueError
        If the image is not in RAS orientation or the shapes differ.
    """
    image_nii = nib.load(data_dir / "images" / f"{case_id}.nii.gz")
    label_nii = nib.load(data_dir / "labels" / f"{case_id}.nii.gz")
    axcodes = nib.aff2axcodes(image_nii.affine)  # type: ignore[attr-defined,no-untyped-call]
    if tuple(axcodes) != ("R", "A", "S"):
        raise ValueError(f"{case_id}: expected RAS axcodes, got {axcodes}")
    image = np.asarray(image_nii.get_fdata(dtype=np.float32))  # type: ignore[attr-defined]
    label = np.asarray(label_nii.dataobj, dtype=np.uint8)  # type: ignore[attr-defined]
    if image.shape != label.shape:
        raise ValueError(f"{case_id}: image {image.shape} and label {label.shape} differ")
    return image, label


def memory_format_for(device: str) -> torch.memory_format:
    """Return the tensor layout the network runs fastest in on ``device``.

    On CPU, channels-last (NDHWC) lets oneDNN run the 3D convolutions without reordering
    every input and output; measured about 1.4x faster for this network on this project's CPU
    (``benchmarks/inference_time.py``). CUDA keeps the default layout.

    Parameters
    ----------
    device
        Torch device string.

    Returns
    -------
    torch.memory_format
        ``torch.channels_last_3d`` on CPU, ``torch.contiguous_format`` elsewhere.
    """
    if torch.device(device).type == "cpu":
        return torch.channels_last_3d
    return torch.contiguous_format


def predict_probabilities(
    model: UNet3d, image_norm: np.ndarray, device: str, *, mirror: bool
) -> torch.Tensor:
    """Return the class probabilities of one normalised volume, shape ``(classes, *image)``.

    Parameters
    ----------
    model
        The network, in eval mode, on ``device``.
    image_norm
        A normalised 3D image (see :func:`normalise`), RAS array order, 1 mm.
    device
        Torch device string.
    mirror
        Average the softmax of the image and of its left-right mirror (axis 0). Only the
        left-right axis is mirrored: the labels are defined along the anterior-posterior axis.
        Both go through the network as one batch of two, which costs less than two passes.
    """
    probs = predict_passes(model, image_norm, device, mirror=mirror)
    return probs.mean(dim=0)


def predict_passes(
    model: UNet3d, image_norm: np.ndarray, device: str, *, mirror: bool
) -> torch.Tensor:
    """Return the class probabilities of each test-time pass, shape ``(passes, classes, *image)``.

    Pass 0 is the image itself; with ``mirror``, pass 1 is its left-right mirror, flipped back
    into the image's orientation. Parameters as for :func:`predict_probabilities`.
    """
    x = torch.from_numpy(np.ascontiguousarray(image_norm, dtype=np.float32))[None, None]
    if mirror:
        x = torch.cat([x, x.flip(2)])
    x = x.to(device).contiguous(memory_format=memory_format_for(device))
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)
        if mirror:
            probs = torch.stack([probs[0], probs[1].flip(1)])
    return probs


def predict_labels(
    model: UNet3d, image_norm: np.ndarray, device: str, *, mirror: bool
) -> np.ndarray:
    """Run the network on one normalised volume and return its uint8 label map."""
    return class_labels(predict_probabilities(model, image_norm, device, mirror=mirror))


def class_labels(probs: torch.Tensor) -> np.ndarray:
    """Return the uint8 label map of class probabilities ``(classes, *image)``: each voxel's most
    probable class, the first one on a tie.

    On CPU numpy finds it: ``torch.argmax`` over the leading (class) axis takes about 10 ms
    for a 3 x 35 x 51 x 32 crop on one thread, numpy about 1 ms, with the same result (both
    return the first maximum).
    """
    if probs.device.type == "cpu":
        labels: np.ndarray = np.argmax(probs.numpy(), axis=0).astype(np.uint8)
        return labels
    on_cpu: np.ndarray = probs.argmax(dim=0).to("cpu", torch.uint8).numpy()
    return on_cpu


class HippocampusSegmenter:
    """Loads the hippocampus U-Net once and labels 1 mm RAS crops.

    Parameters
    ----------
    weights_path
        A file written by :func:`inference.hippocampus.train.train`.
    device
        Torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.

    Raises
    ------
    ValueError
        If the file is not a hippocampus weights file.
    """

    def __init__(self, weights_path: Path, device: str) -> None:
        checkpoint = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or not {"state_dict", "meta"} <= checkpoint.keys():
            raise ValueError(f"{weights_path}: not a weights file with state_dict and meta")
        self._meta: dict[str, Any] = dict(checkpoint["meta"])
        self._device = device
        model = UNet3d(**self._meta["architecture"])
        state = {key: value.float() for key, value in checkpoint["state_dict"].items()}
        model.load_state_dict(state)
        # Module.to's typed overloads do not name memory_format; the call is documented.
        moved: UNet3d = model.to(device, memory_format=memory_format_for(device))  # type: ignore[call-overload]
        self._model = moved.eval()
        logger.info(
            "loaded %s %s on %s", self._meta.get("model_name"), self._meta.get("version"), device
        )

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata saved with the weights (a copy)."""
        return dict(self._meta)

    @property
    def model(self) -> UNet3d:
        """The network, in eval mode."""
        return self._model

    def segment(self, image_ras: np.ndarray) -> np.ndarray:
        """Label the anterior (1) and posterior (2) hippocampus in one crop.

        Parameters
        ----------
        image_ras
            3D intensities in RAS array order at 1 mm isotropic spacing, as returned by
            nibabel's ``get_fdata()`` for the MSD crops. Any shape; the network pads to a
            multiple of 8 internally and crops back.

        Returns
        -------
        numpy.ndarray
            uint8 label map of the same shape: 0 background, 1 anterior, 2 posterior.

        Raises
        ------
        ValueError
            If the array is not 3D or holds non-finite values.
        """
        return predict_labels(self._model, normalise(checked(image_ras)), self._device, mirror=True)


class HippocampusEnsemble:
    """Several trained U-Nets (e.g. two seeds) whose mirrored softmax outputs are averaged.

    Parameters
    ----------
    weights_paths
        Files written by :func:`inference.hippocampus.train.train`, same architecture family.
    device
        Torch device string.
    """

    def __init__(self, weights_paths: Sequence[Path], device: str) -> None:
        if not weights_paths:
            raise ValueError("an ensemble needs at least one weights file")
        self.members = [HippocampusSegmenter(path, device) for path in weights_paths]
        self._device = device

    @property
    def version(self) -> str:
        """The members' versions and seeds, e.g. ``1.0.0s0+1.0.0s1``."""
        return "+".join(f"{m.meta.get('version')}s{m.meta.get('seed')}" for m in self.members)

    def segment(self, image_ras: np.ndarray) -> np.ndarray:
        """Label a crop like :meth:`HippocampusSegmenter.segment`, averaging every member."""
        return self.segment_with_passes(image_ras)[0]

    def segment_with_passes(self, image_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Label a crop, and also return the labels of the unmirrored and the mirrored passes.

        Parameters
        ----------
        image_ras
            As for :meth:`HippocampusSegmenter.segment`.

        Returns
        -------
        tuple of numpy.ndarray
            uint8 label maps, same shape as the input: every pass of every member averaged
            (the result), the unmirrored passes averaged over members, the mirrored passes
            (flipped back) averaged over members.

        Raises
        ------
        ValueError
            If the array is not 3D or holds non-finite values.
        """
        image = normalise(checked(image_ras))
        passes = torch.stack(
            [predict_passes(m.model, image, self._device, mirror=True) for m in self.members]
        ).sum(dim=0)
        labels = [class_labels(probs) for probs in (passes.sum(dim=0), passes[0], passes[1])]
        return labels[0], labels[1], labels[2]


def checked(image_ras: np.ndarray) -> np.ndarray:
    """Return ``image_ras`` as an array after checking it is a finite 3D volume.

    Raises
    ------
    ValueError
        If the array is not 3D or holds non-finite values.
    """
    image = np.asarray(image_ras)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image holds NaN or infinite values")
    return image


def dice_per_class(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of each hippocampus label between two label maps.

    A class absent from both maps scores 1.0.

    Parameters
    ----------
    prediction, truth
        Label maps of the same shape.

    Returns
    -------
    dict
        ``{"anterior": ..., "posterior": ...}``.
    """
    scores: dict[str, float] = {}
    for value, name in LABEL_NAMES.items():
        pred = prediction == value
        ref = truth == value
        total = int(pred.sum()) + int(ref.sum())
        scores[name] = 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total
    return scores


def summarise_dice(per_case: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Average per-case Dice scores over cases.

    Parameters
    ----------
    per_case
        ``{case_id: {"anterior": ..., "posterior": ...}}``.

    Returns
    -------
    dict
        Mean ``anterior`` and ``posterior`` Dice, their ``mean``, ``n_cases`` and
        ``per_case``.
    """
    summary: dict[str, Any] = {
        name: float(np.mean([scores[name] for scores in per_case.values()]))
        for name in LABEL_NAMES.values()
    }
    summary["mean"] = float(np.mean([summary[name] for name in LABEL_NAMES.values()]))
    summary["n_cases"] = len(per_case)
    summary["per_case"] = per_case
    return summary


def evaluate(
    segmenter: HippocampusSegmenter | HippocampusEnsemble, data_dir: Path, case_ids: Sequence[str]
) -> dict[str, Any]:
    """Score a segmenter against the reference labels of some cases.

    Parameters
    ----------
    segmenter
        A loaded segmenter.
    data_dir
        The dataset folder with ``images/`` and ``labels/``.
    case_ids
        Cases to score, e.g. ``segmenter.meta["split"]["test"]``.

    Returns
    -------
    dict
        Mean per-case Dice for ``anterior`` and ``posterior``, their ``mean``, ``n_cases``
        and the ``per_case`` scores (see :func:`summarise_dice`).

    Raises
    ------
    ValueError
        If ``case_ids`` is empty.
    """
    if not case_ids:
        raise ValueError("no cases to evaluate")
    per_case: dict[str, dict[str, float]] = {}
    for case_id in case_ids:
        image, label = load_case(data_dir, case_id)
        per_case[case_id] = dice_per_class(segmenter.segment(image), label)
    return summarise_dice(per_case)
