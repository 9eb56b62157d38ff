"""Train the hippocampus U-Net on the MSD Task04 crops and write one weights file with metadata."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.hippocampus.model import DEFAULT_ARCHITECTURE, UNet3d
from inference.hippocampus.predict import (
    LABEL_NAMES,
    NORMALISATION,
    HippocampusSegmenter,
    dice_per_class,
    evaluate,
    list_cases,
    load_case,
    normalise,
    predict_labels,
    summarise_dice,
)

logger = logging.getLogger(__name__)

MODEL_NAME = "hippocampus-unet3d"
MODEL_VERSION = "1.0.0"

#: Training patch in RAS array order; covers almost every MSD crop (largest 43x59x47).
PATCH_SHAPE: tuple[int, int, int] = (40, 56, 40)

SPLIT_RULE = (
    "case ids sorted; index i in that list: i % 5 == 0 -> test (held out), "
    "other cases form the training pool; index j in the training pool: j % 12 == 0 -> "
    "validation (best-epoch selection), the rest -> training"
)

ATTRIBUTION = (
    "Trained on the Medical Segmentation Decathlon Task04 Hippocampus data, CC-BY-SA 4.0: "
    "Simpson et al., 'A large annotated medical image dataset for the development and "
    "evaluation of segmentation algorithms', 2019."
)

Case = tuple[np.ndarray, np.ndarray]


def split_cases(case_ids: Sequence[str]) -> dict[str, list[str]]:
    """Split case ids deterministically into training, validation and test sets.

    The split does not depend on the seed: see :data:`SPLIT_RULE`.

    Parameters
    ----------
    case_ids
        All case ids.

    Returns
    -------
    dict
        ``{"train": [...], "validation": [...], "test": [...]}``.
    """
    ordered = sorted(case_ids)
    test = [case for i, case in enumerate(ordered) if i % 5 == 0]
    pool = [case for i, case in enumerate(ordered) if i % 5 != 0]
    validation = [case for j, case in enumerate(pool) if j % 12 == 0]
    train_ids = [case for j, case in enumerate(pool) if j % 12 != 0]
    return {"train": train_ids, "validation": validation, "test": test}


def _load_normalised(data_dir: Path, case_id: str) -> Case:
    """Read one case and z-score its image."""
    image, label = load_case(data_dir, case_id)
    return normalise(image), label


def _sample_patch(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Case:
    """Cut a random :data:`PATCH_SHAPE` patch, padding small axes by edge replication."""
    for axis, size in enumerate(PATCH_SHAPE):
        extent = image.shape[axis]
        if extent < size:
            before = int(rng.integers(0, size - extent + 1))
            widths = [(0, 0)] * 3
            widths[axis] = (before, size - extent - before)
            image = np.pad(image, widths, mode="edge")
            label = np.pad(label, widths, mode="constant")
        elif extent > size:
            start = int(rng.integers(0, extent - size + 1))
            image = np.take(image, range(start, start + size), axis=axis)
            label = np.take(label, range(start, start + size), axis=axis)
    return image, label


def _augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Case:
    """Mirror left-right and jitter intensity.

    Only axis 0 (left-right) is mirrored: anterior and posterior are defined along axis 1,
    and a superior-inferior mirror makes anatomy that does not occur.
    """
    if rng.random() < 0.5:
        image = image[::-1]
        label = label[::-1]
    image = image * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


def _scale_jitter(
    images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom 30 % of a batch's samples by an isotropic factor in [0.9, 1.1] about the centre."""
    factors = [
        float(rng.uniform(0.9, 1.1)) if rng.random() < 0.3 else 1.0
        for _ in range(images.shape[0])
    ]
    if all(factor == 1.0 for factor in factors):
        return images, labels
    theta = torch.zeros(images.shape[0], 3, 4, dtype=images.dtype, device=images.device)
    for i, factor in enumerate(factors):
        theta[i, :, :3] = torch.eye(3) * factor
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    warped = F.grid_sample(
        labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return images, warped[:, 0].long()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus one minus the soft Dice of the foreground classes.

    The Dice is computed over the whole batch (batch Dice) for each foreground class and
    averaged over classes.

    Parameters
    ----------
    logits
        ``(batch, classes, d0, d1, d2)`` network output.
    target
        ``(batch, d0, d1, d2)`` integer labels.

    Returns
    -------
    torch.Tensor
        The scalar loss.
    """
    cross_entropy = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * intersection + 1e-5) / (denominator + 1e-5)
    return cross_entropy + (1.0 - dice.mean())


def _learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then polynomial (power 0.9) decay towards zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * float((1.0 - step / total_steps) ** 0.9)


def _validate(model: UNet3d, cases: Sequence[Case], device: str) -> dict[str, Any]:
    """Mean per-case Dice on normalised validation cases (no mirroring, for speed)."""
    model.eval()
    per_case = {
        str(i): dice_per_class(predict_labels(model, image, device, mirror=False), label)
        for i, (image, label) in enumerate(cases)
    }
    model.train()
    return summarise_dice(per_case)


def _save(out_path: Path, model: UNet3d, meta: dict[str, Any]) -> None:
    """Write float16 weights and metadata atomically (temporary file, then rename)."""
    state = {
        key: value.detach().to("cpu", torch.float16) for key, value in model.state_dict().items()
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".tmp")
    torch.save({"state_dict": state, "meta": meta}, partial)
    partial.replace(out_path)


def train(
    data_dir: Path,
    out_path: Path,
    *,
    epochs: int,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    max_cases: int | None = None,
    num_threads: int | None = None,
    batch_size: int = 4,
    learning_rate: float = 2e-3,
) -> dict[str, Any]:
    """Train the U-Net, keep the best validation epoch, score it on the held-out cases, save it.

    One epoch is one pass over the training cases in a seeded random order, each as a random
    :data:`PATCH_SHAPE` patch with left-right mirroring, intensity jitter and (for 30 % of
    patches) isotropic zoom jitter. Images are normalised with
    :func:`~inference.hippocampus.predict.normalise`. The loss is cross-entropy plus soft
    Dice; the optimiser is Adam with linear warm-up and polynomial decay. The weights of the
    epoch with the best mean validation Dice are written to ``out_path`` as float16 (a
    ``.best.pt`` checkpoint beside it is kept during training and removed at the end), then
    reloaded and scored on the held-out test cases; the scores go into the metadata.

    Parameters
    ----------
    data_dir
        The MSD hippocampus folder with ``images/`` and ``labels/``.
    out_path
        Where to write the weights file.
    epochs
        Number of passes over the training cases.
    seed
        Seeds weight initialisation, case order and augmentation. The split does not
        depend on it (see :func:`split_cases`).
    device
        Torch device string.
    progress
        Called with one line per epoch (loss, validation Dice per class, seconds) and a
        final summary; ``None`` for silence.
    max_cases
        For smoke tests: use at most this many training, validation and test cases each.
        The split rule is unchanged.
    num_threads
        If given, passed to :func:`torch.set_num_threads`; otherwise torch's setting stands.
    batch_size
        Patches per optimiser step.
    learning_rate
        Peak Adam learning rate.

    Returns
    -------
    dict
        ``weights_path``, ``meta`` (as saved) and ``history`` (one dict per epoch).

    Raises
    ------
    ValueError
        If ``epochs`` or ``batch_size`` is below 1.
    FileNotFoundError
        If ``data_dir`` holds no cases.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}"
        )
    report = progress if progress is not None else (lambda line: None)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()

    split = split_cases(list_cases(data_dir))
    if max_cases is not None:
        split = {name: ids[:max_cases] for name, ids in split.items()}
    train_cases = [_load_normalised(data_dir, case_id) for case_id in split["train"]]
    val_cases = [_load_normalised(data_dir, case_id) for case_id in split["validation"]]
    report(
        f"hippocampus: {len(train_cases)} training, {len(val_cases)} validation, "
        f"{len(split['test'])} test cases; {epochs} epochs on {device}, seed {seed}"
    )

    model = UNet3d(**DEFAULT_ARCHITECTURE).to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps_per_epoch = math.ceil(len(train_cases) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(50, total_steps)
    best_path = out_path.with_name(out_path.stem + ".best.pt")
    hyperparameters: dict[str, Any] = {
        "patch_shape": list(PATCH_SHAPE),
        "batch_size": batch_size,
        "optimiser": "Adam (betas 0.9, 0.999, no weight decay)",
        "learning_rate": learning_rate,
        "schedule": (
            f"linear warm-up over {warmup_steps} steps, then poly decay (power 0.9) per step"
        ),
        "loss": "cross-entropy + (1 - soft batch Dice over anterior and posterior)",
        "augmentation": "left-right mirror p=0.5; intensity x U(0.9,1.1) + U(-0.1,0.1); "
        "isotropic zoom U(0.9,1.1) p=0.3; random patch position",
        "max_cases": max_cases,
    }
    meta: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "version": MODEL_VERSION,
        "axcodes": ("R", "A", "S"),
        "spacing_mm": (1.0, 1.0, 1.0),
        "normalisation": NORMALISATION,
        "label_names": dict(LABEL_NAMES),
        "architecture": dict(DEFAULT_ARCHITECTURE),
        "seed": seed,
        "split": list(split["test"]),
        "validation_cases": list(split["validation"]),
        "split_rule": SPLIT_RULE,
        "epochs": epochs,
        "hyperparameters": hyperparameters,
        "test_time_augmentation": "mean softmax of the image and its left-right mirror",
        "device": device,
        "torch_version": str(torch.__version__),
        "attribution": ATTRIBUTION,
    }

    history: list[dict[str, Any]] = []
    best_mean = -1.0
    step = 0
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        order = rng.permutation(len(train_cases))
        losses: list[float] = []
        for first in range(0, len(order), batch_size):
            patches = [
                _augment(*_sample_patch(train_cases[i][0], train_cases[i][1], rng), rng)
                for i in order[first : first + batch_size]
            ]
            images = torch.from_numpy(np.stack([p[0] for p in patches]))[:, None].to(device)
            labels = torch.from_numpy(np.stack([p[1] for p in patches]).astype(np.int64)).to(device)
            images, labels = _scale_jitter(images, labels, rng)
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(step, total_steps, learning_rate, warmup_steps)
            optimiser.zero_grad(set_to_none=True)
            loss = dice_ce_loss(model(images), labels)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            losses.append(float(loss.detach()))
            step += 1
        scores = _validate(model, val_cases, device)
        seconds = time.perf_counter() - epoch_started
        history.append(
            {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": seconds}
            | {key: scores[key] for key in ("anterior", "posterior", "mean")}
        )
        marker = ""
        if scores["mean"] > best_mean:
            best_mean = scores["mean"]
            _save(best_path, model, meta | {"best_epoch": epoch, "validation_dice": history[-1]})
            marker = "  *best"
        line = (
            f"epoch {epoch}/{epochs}  loss {np.mean(losses):.4f}  val dice anterior "
            f"{scores['anterior']:.4f} posterior {scores['posterior']:.4f} mean "
            f"{scores['mean']:.4f}  {seconds:.1f} s{marker}"
        )
        logger.info(line)
        report(line)

    best = torch.load(best_path, map_location="cpu", weights_only=True)
    meta = dict(best["meta"])
    meta["training_seconds"] = round(time.perf_counter() - started, 1)
    best_path.replace(out_path)
    # Score the float16 weights exactly as shipped, through the public segmenter.
    held_out = evaluate(HippocampusSegmenter(out_path, device), data_dir, split["test"])
    meta["held_out_dice"] = {
        key: held_out[key] for key in ("anterior", "posterior", "mean", "n_cases")
    }
    final = UNet3d(**DEFAULT_ARCHITECTURE)
    final.load_state_dict({key: value.float() for key, value in best["state_dict"].items()})
    _save(out_path, final, meta)
    report(
        f"best epoch {meta['best_epoch']}; held-out dice anterior {held_out['anterior']:.4f} "
        f"posterior {held_out['posterior']:.4f} mean {held_out['mean']:.4f} "
        f"({held_out['n_cases']} cases); {meta['training_seconds']:.0f} s; saved {out_path}"
    )
    return {"weights_path": str(out_path), "meta": meta, "history": history}
