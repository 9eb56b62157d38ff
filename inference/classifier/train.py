"""Train one fold of a classifier on preprocessed data and write checkpoints and validation metrics."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.classifier.dataset import (
    ArtifactError,
    DatasetError,
    TaskRoots,
    find_task_dir,
    labels_from_json,
    preprocessed_dir,
    results_dir,
)
from inference.classifier.metrics import classification_metrics
from inference.classifier.model import I3dClassifier
from inference.classifier.predictor import (
    FINAL_CHECKPOINT,
    ensemble_probabilities,
    fit_to_patch,
    load_fold,
    network_input,
)

logger = logging.getLogger(__name__)

LATEST_CHECKPOINT = "checkpoint_latest.pt"
METRICS_FILE = "validation_metrics.json"
PREDICTIONS_FILE = "validation_predictions.json"
AUGMENTATION = (
    "random position of the case in the patch (pad/crop offset); mirroring along the configured "
    "axes p=0.5 each; per-channel intensity x U(0.9, 1.1) + U(-0.1, 0.1); Gaussian noise "
    "sigma U(0, 0.1) p=0.15. No spatial scaling: size may be what a label is about."
)

Loaded = tuple[np.ndarray, np.ndarray]


class _Fold:
    """The preprocessed cases, targets and configuration of one fold."""

    def __init__(self, data_root: Path | TaskRoots, task: str | int, configuration: str, fold: int) -> None:
        if fold not in range(5):
            raise ValueError(f"FOLD must be 0-4, not {fold}")
        task_dir_name = find_task_dir(data_root, task).name
        self.pre = preprocessed_dir(data_root, task_dir_name)
        if not (self.pre / "plans.json").is_file():
            raise DatasetError(f"{self.pre}: no plans.json: run classifier plan-and-preprocess first")
        self.plans: dict[str, Any] = json.loads((self.pre / "plans.json").read_text(encoding="utf-8"))
        configurations = self.plans["configurations"]
        if configuration not in configurations:
            raise DatasetError(
                f"{self.pre / 'plans.json'}: no configuration {configuration!r} (known: {', '.join(configurations)})"
            )
        self.config: dict[str, Any] = dict(configurations[configuration])
        self.name = configuration
        self.fold = fold
        self.artifact = results_dir(data_root, task_dir_name, configuration)
        self.out = self.artifact / f"fold_{fold}"
        split = json.loads((self.pre / "splits_final.json").read_text(encoding="utf-8"))[fold]
        self.cases: dict[str, Any] = json.loads((self.pre / "cases.json").read_text(encoding="utf-8"))
        self.train_ids: list[str] = split["train"]
        self.val_ids: list[str] = split["val"]
        self.labels = labels_from_json(self.plans["classification_labels"])
        self.n_roi = len(self.plans["roi_labels"]) - 1

    def load(self, case_ids: Sequence[str]) -> list[Loaded]:
        return [
            (np.load(self.pre / "cases" / f"{c}.npy", mmap_mode="r"),
             np.load(self.pre / "cases" / f"{c}_roi.npy", mmap_mode="r"))
            for c in case_ids
        ]

    def targets(self, case_ids: Sequence[str]) -> np.ndarray:
        return np.array([[self.cases[c]["targets"][label.name] for label in self.labels] for c in case_ids])


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (classes * count)``; an absent class gets weight 0."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, targets.size / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _augment(data: np.ndarray, roi: np.ndarray, config: dict[str, Any], rng: np.random.Generator) -> Loaded:
    data, roi = fit_to_patch(np.asarray(data), np.asarray(roi), config["patch_size"], rng)
    for axis in config.get("mirror_axes", []):
        if rng.random() < 0.5:
            data = data[:, ::-1] if axis == 0 else data[:, :, ::-1] if axis == 1 else data[:, :, :, ::-1]
            roi = np.flip(roi, int(axis))
    if config.get("intensity_augmentation", True):
        scale = rng.uniform(0.9, 1.1, size=(data.shape[0], 1, 1, 1))
        shift = rng.uniform(-0.1, 0.1, size=(data.shape[0], 1, 1, 1))
        data = data * scale + shift
        if rng.random() < 0.15:
            data = data + rng.normal(0.0, rng.uniform(0.0, 0.1), size=data.shape)
    return np.ascontiguousarray(data, dtype=np.float32), np.ascontiguousarray(roi)


def recalibrate_batch_norm(model: I3dClassifier, fold: _Fold, cases: Sequence[Loaded], device: str) -> None:
    """Recompute the batch-norm running statistics of the current weights (precise BN).

    The running averages kept during training trail weights that change every step, which
    shifts the evaluation-mode outputs (good ranking, poor calibration). One pass over the
    un-augmented, centred training cases with a cumulative average makes evaluation use the
    statistics of the weights as they are. Training itself uses batch statistics, so this
    does not change the optimisation.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    batch_size = int(fold.config["batch_size"])
    with torch.no_grad():
        for first in range(0, len(cases), batch_size):
            fitted = [fit_to_patch(np.asarray(d), np.asarray(r), fold.config["patch_size"])
                      for d, r in cases[first : first + batch_size]]
            model(network_input(np.stack([f[0] for f in fitted]), np.stack([f[1] for f in fitted]), fold.n_roi)
                  .to(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def _predict(models: Sequence[I3dClassifier], fold: _Fold, cases: Sequence[Loaded], device: str) -> list[np.ndarray]:
    """Per-label probabilities ``(n, classes)`` for preprocessed cases, as :mod:`predict` does."""
    outputs: list[list[np.ndarray]] = [[] for _ in fold.labels]
    for data, roi in cases:
        fitted = fit_to_patch(np.asarray(data), np.asarray(roi), fold.config["patch_size"])
        batch = network_input(fitted[0][None], fitted[1][None], fold.n_roi).to(device)
        for store, probs in zip(outputs, ensemble_probabilities(models, batch, fold.config.get("mirror_axes", [])),
                                strict=True):
            store.append(probs[0])
    return [np.stack(store) for store in outputs]


def _metrics(fold: _Fold, probabilities: list[np.ndarray], targets: np.ndarray) -> dict[str, Any]:
    per_label = {
        label.name: classification_metrics(probabilities[i], targets[:, i]) for i, label in enumerate(fold.labels)
    }
    mean = {}
    for key in ("auc", "accuracy", "balanced_accuracy"):
        values = [m[key] for m in per_label.values() if not math.isnan(m[key])]
        mean[key] = float(np.mean(values)) if values else float("nan")
    return {"labels": per_label, "mean_over_labels": mean}


def _json_safe(value: Any) -> Any:
    """NaN (an AUC with one class present) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def validate(fold: _Fold, device: str) -> dict[str, Any]:
    """Score the final checkpoint of a fold on its validation cases and write the JSON files."""
    path = fold.out / FINAL_CHECKPOINT
    if not path.is_file():
        raise ArtifactError(f"{path} missing: train fold {fold.fold} first (without --validation_only)")
    model, meta = load_fold(path, device)
    probabilities = _predict([model], fold, fold.load(fold.val_ids), device)
    targets = fold.targets(fold.val_ids)
    metrics = {"task": fold.plans["task"], "configuration": fold.name, "fold": fold.fold,
               "checkpoint": FINAL_CHECKPOINT, "epochs_trained": meta["epochs_trained"],
               "n_validation_cases": len(fold.val_ids)} | _metrics(fold, probabilities, targets)
    predictions = {
        case_id: {
            label.name: {"target": label.classes[int(targets[n, i])],
                         "probabilities": dict(zip(label.classes, map(float, probabilities[i][n]), strict=True))}
            for i, label in enumerate(fold.labels)
        }
        for n, case_id in enumerate(fold.val_ids)
    }
    safe: dict[str, Any] = _json_safe(metrics)
    metrics = safe
    (fold.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False), encoding="utf-8")
    (fold.out / PREDICTIONS_FILE).write_text(json.dumps(predictions, indent=2), encoding="utf-8")
    return metrics


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _save(path: Path, model: I3dClassifier, meta: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, partial)
    partial.replace(path)


def _write_artifact_files(fold: _Fold) -> None:
    fold.out.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        (fold.artifact / name).write_bytes((fold.pre / name).read_bytes())


def train(
    data_root: Path | TaskRoots,
    configuration: str,
    task: str | int,
    fold: int,
    *,
    validation_only: bool = False,
    epochs: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    num_threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train fold ``fold`` (0-4) of a planned task, then score it on the fold's validation cases.

    Each epoch is one pass over the training cases in a seeded random order, augmented as
    :data:`AUGMENTATION` says. The loss is the sum over labels of class-weighted
    cross-entropy (inverse class frequency in the fold's training cases); AdamW with a
    cosine learning-rate decay. After every epoch the batch-norm statistics are recomputed
    on the training cases (:func:`recalibrate_batch_norm`), the validation loss and mean AUC
    are reported and ``checkpoint_latest.pt`` is written; the final weights become
    ``checkpoint_final.pt`` and are scored (no best-epoch selection, so the validation
    metrics are not optimistic).

    Parameters
    ----------
    data_root
        The data root in either layout, or its resolved roots (see ``task_roots``).
    configuration
        A configuration name from ``plans.json`` (``3d``).
    task
        Task id or folder name.
    fold
        0-4.
    validation_only
        Only re-run the validation of an already trained fold.
    epochs
        Overrides the configuration's epoch count.
    device
        Torch device string.
    seed
        Seeds initialisation, order and augmentation.
    num_threads
        Passed to :func:`torch.set_num_threads` when given.
    progress
        Called with one line per epoch.

    Returns
    -------
    dict
        The validation metrics written to ``fold_N/validation_metrics.json``.

    Raises
    ------
    DatasetError
        If the task is not planned or the configuration is unknown.
    ArtifactError
        With ``validation_only`` when the fold is not trained.
    ValueError
        If ``fold`` or ``epochs`` is out of range.
    """
    report = progress or (lambda line: None)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    state = _Fold(data_root, task, configuration, fold)
    if validation_only:
        metrics = validate(state, device)
        report(f"fold {fold} validation: {json.dumps(metrics['mean_over_labels'])}")
        return metrics
    config = state.config
    n_epochs = int(epochs if epochs is not None else config["epochs"])
    if n_epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {n_epochs}")
    _write_artifact_files(state)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    train_cases, val_cases = state.load(state.train_ids), state.load(state.val_ids)
    train_targets, val_targets = state.targets(state.train_ids), state.targets(state.val_ids)
    weights = [class_weights(train_targets[:, i], len(label.classes)).to(device)
               for i, label in enumerate(state.labels)]
    architecture = {
        "in_channels": len(state.plans["modalities"]) + state.n_roi,
        "head_classes": [len(label.classes) for label in state.labels],
        **config["architecture"],
    }
    model = I3dClassifier(**architecture).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    batch_size = int(config["batch_size"])
    steps_per_epoch = math.ceil(len(train_cases) / batch_size)
    total_steps = n_epochs * steps_per_epoch
    meta: dict[str, Any] = {
        "task": state.plans["task"], "fold": fold, "configuration_name": configuration,
        "configuration": config, "architecture": architecture, "seed": seed,
        "train_cases": state.train_ids, "val_cases": state.val_ids,
        "class_weights": {label.name: weights[i].tolist() for i, label in enumerate(state.labels)},
        "augmentation": AUGMENTATION, "epochs_planned": n_epochs, "torch_version": str(torch.__version__),
    }
    report(f"{state.plans['task']} fold {fold}: {len(train_cases)} training, {len(val_cases)} validation "
           f"cases; {n_epochs} epochs of {steps_per_epoch} steps on {device}")
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, n_epochs + 1):
        epoch_started = time.perf_counter()
        losses = []
        order = rng.permutation(len(train_cases))
        for first in range(0, len(train_cases), batch_size):
            index = order[first : first + batch_size]
            pairs = [_augment(train_cases[i][0], train_cases[i][1], config, rng) for i in index]
            batch = network_input(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), state.n_roi)
            targets = torch.from_numpy(train_targets[index]).long().to(device)
            for group in optimiser.param_groups:
                group["lr"] = config["learning_rate"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            optimiser.zero_grad(set_to_none=True)
            logits = model(batch.to(device))
            loss = sum((F.cross_entropy(out, targets[:, i], weight=weights[i]) for i, out in enumerate(logits)),
                       torch.zeros((), device=device))
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            losses.append(float(loss.detach()))
            step += 1
        recalibrate_batch_norm(model, state, train_cases, device)
        probabilities = _predict([model], state, val_cases, device)
        model.train()
        val_loss = sum(
            float(F.nll_loss(torch.log(torch.from_numpy(p).clamp_min(1e-7)), torch.from_numpy(val_targets[:, i]).long()))
            for i, p in enumerate(probabilities)
        )
        scores = _metrics(state, probabilities, val_targets)["mean_over_labels"]
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                        "seconds": time.perf_counter() - epoch_started} | {f"val_{k}": v for k, v in scores.items()})
        _save(state.out / LATEST_CHECKPOINT, model, meta | {"epochs_trained": epoch})
        line = (f"fold {fold} epoch {epoch}/{n_epochs}  train loss {history[-1]['train_loss']:.4f}  val loss "
                f"{val_loss:.4f}  val AUC {scores['auc']:.3f}  acc {scores['accuracy']:.3f}  bal acc "
                f"{scores['balanced_accuracy']:.3f}  {history[-1]['seconds']:.1f} s")
        logger.info(line)
        report(line)
    meta |= {"epochs_trained": n_epochs, "training_seconds": round(time.perf_counter() - started, 1)}
    _save(state.out / FINAL_CHECKPOINT, model, meta)
    (state.out / "progress.json").write_text(json.dumps(_json_safe(history), indent=2), encoding="utf-8")
    (state.out / LATEST_CHECKPOINT).unlink(missing_ok=True)
    metrics = validate(state, device)
    report(f"fold {fold} final validation: " + ", ".join(
        f"{name} AUC {_text(m['auc'])} acc {_text(m['accuracy'])} bal acc {_text(m['balanced_accuracy'])}"
        for name, m in metrics["labels"].items()) + f"; {meta['training_seconds']:.0f} s; {state.out}")
    return metrics
