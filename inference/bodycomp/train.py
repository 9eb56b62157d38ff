"""Training the body-composition networks: the 2D U-Net on npy slices, the slice selector on PNGs with z offsets."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from inference.bodycomp import segmentation, slice_selection
from inference.bodycomp.config import DEFAULT_CLASSES, THORACIC_CLASSES, TrainingDataError, parse_model_config
from inference.bodycomp.segmentation import UNet2D, mask_to_target, normalise_hu
from inference.bodycomp.slice_selection import Z_SCALE_MM, SliceSelectionNet, to_network_input

logger = logging.getLogger(__name__)

PLOT_COLOURS = ("red", "blue", "green", "orange", "purple", "brown", "magenta", "cyan")


@dataclass(frozen=True)
class SegmentationTraining:
    """Settings of ``train body-segmentation`` (``-a -l -b -t -g`` and the rest)."""

    name: str = "bodycomp_seg"
    learning_rate: float = 1e-3
    batch_size: int = 4
    epochs: int = 30
    thoracic: bool = False
    level: str = "L3"
    input_px: int = 256
    base_channels: int = 16
    gpus: int = 0
    seed: int = 0


@dataclass(frozen=True)
class SliceSelectionTraining:
    """Settings of ``train slice-selection`` (``-L -a -l -b -g`` and the rest)."""

    name: str = "bodycomp_slice_selection"
    levels: tuple[str, ...] = ("L3",)
    learning_rate: float = 1e-3
    batch_size: int = 16
    epochs: int = 30
    sigmoid_output: bool = True
    input_px: int = 128
    gpus: int = 0
    seed: int = 0


def _parallel(net: nn.Module, gpus: int, device: str) -> nn.Module:
    net.to(device)
    if gpus > 1 and device.startswith("cuda") and torch.cuda.device_count() > 1:
        return nn.DataParallel(net, device_ids=list(range(min(gpus, torch.cuda.device_count()))))
    return net


def load_segmentation_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map ``{split}_images.npy`` (N x 512 x 512 x 1 HU) and ``{split}_masks.npy`` (uint8 0..3).

    Raises
    ------
    TrainingDataError
        If a file is missing or the shapes or mask values break the contract.
    """
    try:
        images = np.load(data_dir / f"{split}_images.npy", mmap_mode="r")
        masks = np.load(data_dir / f"{split}_masks.npy", mmap_mode="r")
    except OSError as exc:
        raise TrainingDataError(f"{data_dir}: {exc}") from None
    if images.ndim != 4 or images.shape[1:] != (512, 512, 1):
        raise TrainingDataError(f"{split}_images.npy: shape {images.shape}, expected N x 512 x 512 x 1")
    if masks.shape[:3] != images.shape[:3] or masks.dtype != np.uint8 or int(masks.max(initial=0)) > 3:
        raise TrainingDataError(f"{split}_masks.npy: expected uint8 0..3 of shape {images.shape[:3]}")
    if not (np.issubdtype(images.dtype, np.floating) or images.dtype.itemsize >= 2):
        raise TrainingDataError(f"{split}_images.npy: dtype {images.dtype}, expected int16 or wider, or float")
    return images, masks


def _segmentation_batch(images: np.ndarray, masks: np.ndarray, index: Sequence[int], class_names: Sequence[str],
                        size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    order = sorted(index)
    x = normalise_hu(np.asarray(images[order], dtype=np.float32)[..., 0])[:, None]
    y = mask_to_target(np.asarray(masks[order])[..., 0], class_names)[:, None].float()
    if size != x.shape[-1]:  # work below 512 when asked; the contract stays 512
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=(size, size), mode="nearest")
    return x.to(device), y[:, 0].long().to(device)


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probabilities = logits.softmax(dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    overlap = (probabilities * one_hot).sum(dim=(0, 2, 3))
    total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return 1.0 - ((2.0 * overlap + 1.0) / (total + 1.0))[1:].mean()


def _write_fragment(folder: Path, fragment: dict[str, Any]) -> Path:
    parse_model_config(fragment, source="config fragment")  # a fragment is always a valid config
    path = folder / "config_fragment.json"
    path.write_text(json.dumps(fragment, indent=2) + "\n")
    return path


def _log_epoch(history: list[dict[str, Any]], folder: Path, row: dict[str, Any]) -> None:
    history.append(row)
    with (folder / "history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(history)
    logger.info("epoch %s", " ".join(f"{k}={v}" for k, v in row.items()))


def train_segmentation(data_dir: Path, model_dir: Path, settings: SegmentationTraining, *, device: str) -> Path:
    """Train the U-Net; write ``best.pt``, ``last.pt``, ``history.csv`` and ``config_fragment.json``.

    Loss: cross-entropy plus soft Dice; validation metric: Dice per class on the validation
    slices (at the working size), the best mean Dice kept as ``best.pt``.

    Returns
    -------
    pathlib.Path
        The config fragment: a model configuration for ``run-csv`` that segments
        ``settings.level`` with these weights (merge it with a slice-selection fragment).

    Raises
    ------
    TrainingDataError
        If the data do not follow the layout.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    class_names = THORACIC_CLASSES if settings.thoracic else DEFAULT_CLASSES
    train_x, train_y = load_segmentation_split(data_dir, "train")
    val_x, val_y = load_segmentation_split(data_dir, "val")
    folder = model_dir / settings.name
    folder.mkdir(parents=True, exist_ok=True)
    net = UNet2D(len(class_names) + 1, settings.base_channels)
    model = _parallel(net, settings.gpus, device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    history: list[dict[str, Any]] = []
    best = -1.0
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = rng.permutation(len(train_x))
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        losses = []
        for batch in tqdm(batches, desc=f"epoch {epoch}/{settings.epochs}", unit="batch", leave=False):
            x, y = _segmentation_batch(train_x, train_y, batch, class_names, settings.input_px, device)
            logits = model(x)
            loss = F.cross_entropy(logits, y) + _dice_loss(logits, y)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            losses.append(loss.item())
        model.eval()
        overlap = np.zeros(len(class_names))
        total = np.zeros(len(class_names))
        with torch.inference_mode():
            for i in range(0, len(val_x), settings.batch_size):
                x, y = _segmentation_batch(val_x, val_y, range(i, min(i + settings.batch_size, len(val_x))),
                                           class_names, settings.input_px, device)
                predicted = model(x).argmax(dim=1)
                for c in range(len(class_names)):
                    p, t = predicted == c + 1, y == c + 1
                    overlap[c] += float((p & t).sum())
                    total[c] += float(p.sum() + t.sum())
        dice = 2.0 * overlap / np.maximum(total, 1.0)
        row: dict[str, Any] = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4)}
        row.update({f"val_dice_{name}": round(float(d), 4) for name, d in zip(class_names, dice, strict=True)})
        row.update(val_dice_mean=round(float(dice.mean()), 4), seconds=round(time.perf_counter() - started, 2))
        _log_epoch(history, folder, row)
        extra = {"epoch": epoch, "val_dice_mean": float(dice.mean())}
        segmentation.save_checkpoint(folder / "last.pt", net, class_names=class_names,
                                     input_px=settings.input_px, base=settings.base_channels, extra=extra)
        if dice.mean() > best:
            best = float(dice.mean())
            segmentation.save_checkpoint(folder / "best.pt", net, class_names=class_names,
                                         input_px=settings.input_px, base=settings.base_channels, extra=extra)
    return _write_fragment(folder, {"slice_params": {settings.level: {
        "class_names": list(class_names), "model_weights": str((folder / "best.pt").resolve()),
        "regression_plot_colour": "red",
    }}})


def load_slice_selection_split(
    data_dir: Path, split: str, levels: Sequence[str], size: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Read ``images/{split}/*.png`` and the ``ZOffset_<level>`` columns of ``meta/{split}.csv``.

    Row ``i`` of the CSV describes ``ImageFile`` when that column exists, else ``{i:06d}.png``.
    ``ZOffset`` stands for the only level when ``ZOffset_<level>`` is absent.

    Returns
    -------
    tuple[torch.Tensor, numpy.ndarray]
        Images ``(n, 1, size, size)`` in 0..1 and offsets ``(n, len(levels))`` in mm.

    Raises
    ------
    TrainingDataError
        If the CSV, a column or an image is missing.
    """
    meta = data_dir / "meta" / f"{split}.csv"
    try:
        with meta.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise TrainingDataError(f"{meta}: {exc}") from None
    columns = []
    for level in levels:
        column = f"ZOffset_{level}"
        if rows and column not in rows[0]:
            if len(levels) == 1 and "ZOffset" in rows[0]:
                column = "ZOffset"
            else:
                raise TrainingDataError(f"{meta}: no column {column}")
        columns.append(column)
    images = []
    for index, row in enumerate(rows):
        path = data_dir / "images" / split / (row.get("ImageFile") or f"{index:06d}.png")
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("L"), dtype=np.float32))
        except OSError as exc:
            raise TrainingDataError(f"{path}: {exc}") from None
    if not images:
        raise TrainingDataError(f"{meta}: no rows")
    tensor = torch.cat([to_network_input(image[None], size) for image in images])
    offsets = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float64)
    return tensor, offsets


def train_slice_selection(data_dir: Path, model_dir: Path, settings: SliceSelectionTraining, *, device: str) -> Path:
    """Train the slice selector; write ``best.pt``, ``last.pt``, ``history.csv`` and ``config_fragment.json``.

    Sigmoid mode: one output per level, target ``ZOffset_<level> > 0`` (the slice is above the
    level), binary cross-entropy, validation accuracy. Regression mode: one output, target the
    first level's offset / ``Z_SCALE_MM``, smooth L1, validation mean absolute error in mm; each
    level's ``z_pos`` is its median offset from the first level / ``Z_SCALE_MM``.

    Returns
    -------
    pathlib.Path
        The config fragment (slice selection with these weights, classical segmentation until
        merged with a segmentation fragment).
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    levels = settings.levels
    train_x, train_z = load_slice_selection_split(data_dir, "train", levels, settings.input_px)
    val_x, val_z = load_slice_selection_split(data_dir, "val", levels, settings.input_px)
    if settings.sigmoid_output:
        train_t, val_t = torch.from_numpy(train_z > 0).float(), torch.from_numpy(val_z > 0).float()
    else:
        train_t = torch.from_numpy(train_z[:, :1] / Z_SCALE_MM).float()
        val_t = torch.from_numpy(val_z[:, :1] / Z_SCALE_MM).float()
    folder = model_dir / settings.name
    folder.mkdir(parents=True, exist_ok=True)
    net = SliceSelectionNet(len(levels) if settings.sigmoid_output else 1)
    model = _parallel(net, settings.gpus, device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    history: list[dict[str, Any]] = []
    best = float("inf")
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = rng.permutation(len(train_x))
        losses = []
        for i in tqdm(range(0, len(order), settings.batch_size), desc=f"epoch {epoch}/{settings.epochs}",
                      unit="batch", leave=False):
            batch = torch.from_numpy(order[i : i + settings.batch_size])
            out = model(train_x[batch].to(device))
            target = train_t[batch].to(device)
            loss = (F.binary_cross_entropy_with_logits(out, target) if settings.sigmoid_output
                    else F.smooth_l1_loss(out, target))
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            losses.append(loss.item())
        model.eval()
        with torch.inference_mode():
            out = torch.cat([model(val_x[i : i + 64].to(device)).cpu() for i in range(0, len(val_x), 64)])
        row: dict[str, Any] = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4)}
        if settings.sigmoid_output:
            accuracy = ((out > 0).float() == val_t).float().mean(dim=0).numpy()
            row.update({f"val_accuracy_{lv}": round(float(a), 4) for lv, a in zip(levels, accuracy, strict=True)})
            score = 1.0 - float(accuracy.mean())
        else:
            score = float((out - val_t).abs().mean()) * Z_SCALE_MM
            row["val_mae_mm"] = round(score, 2)
        row["seconds"] = round(time.perf_counter() - started, 2)
        _log_epoch(history, folder, row)
        names = ["last.pt"] + (["best.pt"] if score < best else [])
        best = min(best, score)
        for name in names:
            slice_selection.save_checkpoint(folder / name, net, sigmoid_output=settings.sigmoid_output,
                                            levels=levels, input_px=settings.input_px, extra={"epoch": epoch})
    z_pos = {lv: 0.0 if settings.sigmoid_output else
             round(float(np.median(train_z[:, 0] - train_z[:, i])) / Z_SCALE_MM, 4)
             for i, lv in enumerate(levels)}
    return _write_fragment(folder, {
        "sigmoid_output": settings.sigmoid_output,
        "slice_selection_weights": str((folder / "best.pt").resolve()),
        "slice_params": {lv: {
            "slice_selection_model_output_index": i if settings.sigmoid_output else 0,
            "z_pos": z_pos[lv], "regression_plot_colour": PLOT_COLOURS[i % len(PLOT_COLOURS)],
        } for i, lv in enumerate(levels)},
    })
