"""Classification metrics without scikit-learn: ROC AUC (binary and macro one-vs-rest), accuracy, balanced accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve, as the Mann-Whitney U statistic (ties count one half).

    Parameters
    ----------
    scores
        Scores of the positive class, shape ``(n,)``.
    positive
        Booleans, shape ``(n,)``.

    Returns
    -------
    float
        The AUC, or NaN when only one class is present.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(probabilities: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """AUC, accuracy and balanced accuracy of one classification label.

    For two classes the AUC is that of the class-1 probability; for more, the mean of the
    one-vs-rest AUCs of the classes present (macro). Balanced accuracy is the mean recall
    over the classes present in ``targets``.

    Parameters
    ----------
    probabilities
        ``(n, classes)`` predicted probabilities.
    targets
        ``(n,)`` integer class values.

    Returns
    -------
    dict
        ``auc``, ``accuracy``, ``balanced_accuracy``, ``n_cases``, ``class_counts``,
        ``confusion_matrix`` (rows: truth, columns: prediction).

    Raises
    ------
    ValueError
        If the shapes disagree or there are no cases.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if probabilities.ndim != 2 or targets.shape != probabilities.shape[:1] or not targets.size:
        raise ValueError(f"probabilities {probabilities.shape} and targets {targets.shape} do not fit")
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    if n_classes == 2:
        auc = binary_auc(probabilities[:, 1], targets == 1)
    else:
        aucs = [binary_auc(probabilities[:, k], targets == k) for k in range(n_classes)]
        valid = [a for a in aucs if not np.isnan(a)]
        auc = float(np.mean(valid)) if valid else float("nan")
    present = [k for k in range(n_classes) if np.any(targets == k)]
    recalls = [float(np.mean(predicted[targets == k] == k)) for k in present]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    return {
        "auc": auc,
        "accuracy": float(np.mean(predicted == targets)),
        "balanced_accuracy": float(np.mean(recalls)),
        "n_cases": int(targets.size),
        "class_counts": [int(np.sum(targets == k)) for k in range(n_classes)],
        "confusion_matrix": confusion.tolist(),
    }
