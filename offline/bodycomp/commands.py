"""The body-composition commands: ``run-csv``, ``organize``, ``prepare`` and ``train body-segmentation|slice-selection``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.errors import ConfigError

if TYPE_CHECKING:
    from dicom_node.cli.main import CommandParsers

logger = logging.getLogger(__name__)


def _data_errors_as_config_errors(function: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a training set or source that breaks its layout as a configuration error (exit 2)."""

    def wrapped(args: argparse.Namespace) -> int:
        from inference.bodycomp.config import TrainingDataError

        try:
            return function(args)
        except TrainingDataError as exc:
            raise ConfigError(str(exc)) from None

    return wrapped


#: Suffixes of a model configuration file given positionally to ``run-csv``.
CONFIG_SUFFIXES = (".json", ".toml")


def _config_and_paths(option: Path | None, paths: list[Path]) -> tuple[Path | None, list[Path]]:
    """Split ``run-csv``'s positional paths into the optional CONFIG and RESULTS_DIR INPUT_DIR...

    The second positional is the model configuration when it is a ``.json`` or ``.toml`` file
    (the form these commands have always taken); ``-c/--config`` gives it as an option instead.
    """
    positional = paths[0] if paths and paths[0].suffix.lower() in CONFIG_SUFFIXES and paths[0].is_file() else None
    if option is not None and positional is not None:
        raise ConfigError(f"run-csv: two model configurations given: {positional} and -c {option}")
    if positional is not None:
        return positional, paths[1:]
    return option, paths


def cmd_run_csv(args: argparse.Namespace) -> int:
    from offline.bodycomp.csv_runner import RunOptions, read_directory_list, run_csv

    from inference.bodycomp.config import DEFAULT_CONFIG

    config, rest = _config_and_paths(args.config, args.paths)
    if len(rest) < 2:
        raise ConfigError("run-csv: give RESULTS_DIR and at least one INPUT_DIR after the CSV (and the optional CONFIG)")
    results_dir, input_dirs = rest[0], rest[1:]
    if config is None:
        config = DEFAULT_CONFIG
        logger.info("run-csv: no model configuration given: using the shipped %s (classical path, L3)", config)
    if args.rerun_exceptions and not args.keep_existing:
        logger.warning("-e/--rerun_exceptions only applies with -k/--keep_existing; without -k every study "
                       "is processed again anyway")
    inputs: list[Path] = []
    for path in input_dirs:
        inputs.extend(read_directory_list(path) if args.use_directory_list else [path])
    options = RunOptions(
        num_threads=args.num_threads, segmentation_range_mm=args.segmentation_range,
        keep_existing=args.keep_existing, rerun_exceptions=args.rerun_exceptions,
        recursive=args.recursive, studies_at_any_depth=args.studies_at_any_depth, dicom_seg=args.dicom_seg,
        min_slices_per_series=args.min_slices_per_series, device=args.device,
        progress=not args.no_progress,
    )
    counts = run_csv(args.csv, config, results_dir, inputs, options)
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f"; results in {results_dir}")
    return 0 if counts["failed"] == 0 and counts["not_found"] == 0 else 1


def cmd_organize(args: argparse.Namespace) -> int:
    from offline.bodycomp.csv_runner import organize

    counts = organize(args.src, args.dst, threads=args.num_threads)
    print(f"copied {counts['copied']} file(s) into {counts['studies']} study folder(s) under {args.dst};"
          f" {counts['skipped']} non-DICOM file(s) skipped")
    return 0


def _level_z(values: list[str]) -> dict[str, float]:
    levels = {}
    for text in values:
        level, _, z = text.partition("=")
        try:
            levels[level.strip()] = float(z)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--level-z {text!r}: expected LEVEL=Z_MM") from None
    return levels


def cmd_prepare(args: argparse.Namespace) -> int:
    from inference.bodycomp.prepare import prepare_segmentation_set, prepare_slice_selection_set

    written: dict[str, Any] = {}
    if args.tissue_volume is not None:
        masks = {"muscle": args.muscle, "subcutaneous_fat": args.subcutaneous_fat,
                 "visceral_fat": args.visceral_fat}
        written["segmentation"] = prepare_segmentation_set(
            args.tissue_volume, args.out / "segmentation", labels=args.tissue_labels,
            masks={k: v for k, v in masks.items() if v is not None}, val_every=args.val_every,
        )
    if args.volume:
        written["slice_selection"] = prepare_slice_selection_set(
            args.volume, args.out / "slice_selection", levels=args.levels,
            vertebrae=args.vertebrae, level_z_mm=_level_z(args.level_z), val_every=args.val_every,
        )
    if not written:
        print("nothing to prepare: give --tissue-volume and/or --volume", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=2, default=str))
    return 0


def _train_device(gpus: int) -> str:
    import torch

    if gpus > 0 and not torch.cuda.is_available():
        logger.warning("-g/--gpus %d: no CUDA GPU is available here; training on the CPU", gpus)
        return "cpu"
    return "cuda:0" if gpus > 0 else "cpu"


def cmd_train_body_segmentation(args: argparse.Namespace) -> int:
    from inference.bodycomp.train import SegmentationTraining, train_segmentation

    settings = SegmentationTraining(
        name=args.name, learning_rate=args.learning_rate, batch_size=args.batch_size,
        epochs=args.epochs, thoracic=args.thoracic, level=args.level, input_px=args.input_size,
        base_channels=args.base_channels, gpus=args.gpus, seed=args.seed,
    )
    fragment = train_segmentation(args.data_dir, args.model_dir, settings, device=_train_device(args.gpus))
    print(f"config fragment: {fragment}")
    return 0


def cmd_train_slice_selection(args: argparse.Namespace) -> int:
    from inference.bodycomp.train import SliceSelectionTraining, train_slice_selection

    settings = SliceSelectionTraining(
        name=args.name, levels=tuple(args.levels), learning_rate=args.learning_rate,
        batch_size=args.batch_size, epochs=args.epochs, sigmoid_output=not args.regression,
        input_px=args.input_size, gpus=args.gpus, seed=args.seed,
    )
    fragment = train_slice_selection(args.data_dir, args.model_dir, settings, device=_train_device(args.gpus))
    print(f"config fragment: {fragment}")
    return 0


def _add_training_options(p: argparse.ArgumentParser, name: str, lr: float, batch: int, size: int) -> None:
    p.add_argument("data_dir", type=Path)
    p.add_argument("model_dir", type=Path)
    p.add_argument("-a", "--name", default=name, help=f"model name: files go to MODEL_DIR/NAME (default {name})")
    p.add_argument("-g", "--gpus", type=int, default=0, help="GPUs to use (0: CPU; >1: data parallel)")
    p.add_argument("-l", "--learning-rate", type=float, default=lr)
    p.add_argument("-b", "--batch-size", type=int, default=batch)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--input-size", type=int, default=size,
                   help=f"side the network works at; inputs are resized to it (default {size})")
    p.add_argument("--seed", type=int, default=0)


def add_parsers(parsers: CommandParsers) -> None:
    """Add ``run-csv``, ``organize``, ``prepare`` and ``train body-segmentation|slice-selection`` (a ``dicom_node.commands`` entry point).

    Parameters
    ----------
    parsers
        Where ``dicom-node`` takes its installed commands.
    """
    subparsers = parsers.commands
    p = subparsers.add_parser("run-csv", help="body composition on the studies a CSV lists")
    p.add_argument("csv", type=Path, help="columns MRN and ACC (folders MRN_ACC), or StudyName")
    p.add_argument("paths", type=Path, nargs="+", metavar="[CONFIG] RESULTS_DIR INPUT_DIR",
                   help="CONFIG: model configuration (.json or .toml; no weights: classical path); default the "
                        "shipped inference/bodycomp/configs/default.json (classical, L3)")
    p.add_argument("-c", "--config", type=Path, help="the model configuration, as an option")
    p.add_argument("-t", "--num_threads", type=int, default=1, help="threads reading DICOM files")
    p.add_argument("-r", "--segmentation_range", type=float, default=0.0,
                   help="also segment every slice within this many mm of the level and average")
    p.add_argument("-l", "--use_directory_list", action="store_true",
                   help="each INPUT_DIR is a text file listing input folders, one per line")
    p.add_argument("-k", "--keep_existing", action="store_true", help="skip studies already done")
    p.add_argument("-e", "--rerun_exceptions", action="store_true", help="with -k, redo failed studies")
    p.add_argument("-R", "--recursive", action="store_true",
                   help="read the files in each study folder's sub-folders too (default: only files directly in it)")
    p.add_argument("-S", "--studies_at_any_depth", action="store_true",
                   help="find study folders at any depth below each INPUT_DIR (default: directly in it)")
    p.add_argument("-d", "--dicom_seg", action="store_true", help="also write a DICOM SEG per series")
    p.add_argument("-m", "--min_slices_per_series", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run_csv)

    p = subparsers.add_parser("organize", help="copy a DICOM dump into PatientID_AccessionNumber folders")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("-t", "--num_threads", type=int, default=1)
    p.set_defaults(func=cmd_organize)

    p = subparsers.add_parser("prepare", help="build body-composition training sets from CT volumes")
    p.add_argument("out", type=Path, help="writes OUT/segmentation and OUT/slice_selection")
    p.add_argument("--tissue-volume", type=Path, help="CT (NIfTI file or DICOM folder) with tissue labels")
    p.add_argument("--tissue-labels", type=Path, help="label map 0..3 on the tissue volume's grid")
    p.add_argument("--muscle", type=Path, help="skeletal muscle mask (instead of --tissue-labels)")
    p.add_argument("--subcutaneous-fat", type=Path, help="subcutaneous fat mask")
    p.add_argument("--visceral-fat", type=Path, help="visceral (torso) fat mask")
    p.add_argument("--volume", type=Path, action="append", default=[],
                   help="CT for the slice-selection set (repeatable)")
    p.add_argument("--vertebrae", type=Path, action="append", default=[],
                   help="TotalSegmentator v2 vertebra map(s) in the same patient frame (repeatable)")
    p.add_argument("--level-z", action="append", default=[], metavar="LEVEL=Z_MM",
                   help="a level's RAS z in mm, instead of a vertebra map")
    p.add_argument("-L", "--levels", nargs="+", default=["L3"])
    p.add_argument("--val-every", type=int, default=5, help="every Nth slice goes to validation")
    p.set_defaults(func=_data_errors_as_config_errors(cmd_prepare))

    train_group = parsers.group("train")
    p = train_group.add_parser("body-segmentation", help="train the body-composition 2D U-Net")
    _add_training_options(p, "bodycomp_seg", 1e-3, 4, 256)
    p.add_argument("-t", "--thoracic", action="store_true", help="no visceral fat class")
    p.add_argument("--level", default="L3", help="level named in the config fragment (default L3)")
    p.add_argument("--base-channels", type=int, default=16)
    p.set_defaults(func=_data_errors_as_config_errors(cmd_train_body_segmentation))

    p = train_group.add_parser("slice-selection", help="train the slice-selection network")
    _add_training_options(p, "bodycomp_slice_selection", 1e-3, 16, 128)
    p.add_argument("-L", "--levels", nargs="+", default=["L3"])
    p.add_argument("--regression", action="store_true",
                   help="one regression output compared with each level's z_pos (default: a sigmoid per level)")
    p.set_defaults(func=_data_errors_as_config_errors(cmd_train_slice_selection))
