"""The ``dicom-node classifier`` commands: make-demo-task, plan-and-preprocess, train, predict."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.cli.main import CommandParsers

DEFAULT_MSD = Path("../shared/data/hippocampus-msd")


def _print(line: str) -> None:
    print(line, flush=True)


def _fail(exc: ValueError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def cmd_make_demo_task(args: argparse.Namespace) -> int:
    """Write the demonstration task(s) derived from the MSD hippocampus crops."""
    from inference.classifier.demo_task import build_demo_task

    try:
        path = build_demo_task(args.source, args.data_root, task_id=args.task_id,
                               with_roi=not args.without_roi, max_cases=args.max_cases)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print(f"wrote {path} (a demonstration task)")
    return 0


def cmd_plan_and_preprocess(args: argparse.Namespace) -> int:
    """Fingerprint, plan and preprocess a task."""
    from inference.classifier.planning import plan_and_preprocess

    try:
        plan_and_preprocess(args.data_root, args.task, fingerprint_processes=args.tl,
                            preprocess_processes=args.tf, progress=_print)
    except ValueError as exc:
        return _fail(exc)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or only validate) one fold."""
    from inference.classifier.train import train

    try:
        metrics = train(args.data_root, args.configuration, args.task, args.fold,
                        validation_only=args.validation_only, epochs=args.epochs, device=args.device,
                        seed=args.seed, num_threads=args.threads or None, progress=_print)
    except ValueError as exc:
        return _fail(exc)
    _print(json.dumps({"fold": metrics["fold"], "mean_over_labels": metrics["mean_over_labels"]}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify a folder of cases with the ensemble of the given folds."""
    from inference.classifier.dataset import find_task_dir, results_dir
    from inference.classifier.predictor import predict_folder

    try:
        artifact = results_dir(args.data_root, find_task_dir(args.data_root, args.task).name, args.configuration)
        written = predict_folder(artifact, args.input, args.output, roi_dir=args.roi, folds=args.folds,
                                 device=args.device)
    except ValueError as exc:
        return _fail(exc)
    _print(f"wrote {len(written)} prediction(s) to {args.output}")
    return 0


def add_parsers(parsers: CommandParsers) -> None:
    """Add ``classifier`` and its sub-commands to the ``dicom-node`` command (a ``dicom_node.commands`` entry point).

    Parameters
    ----------
    parsers
        Where ``dicom-node`` takes its installed commands.
    """
    parser = parsers.commands.add_parser("classifier", help="train and run 3D image classifiers")
    sub = parser.add_subparsers(dest="classifier_command", required=True)

    p = sub.add_parser("make-demo-task", help="write the demonstration task from the MSD hippocampus crops")
    p.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    p.add_argument("--source", type=Path, default=DEFAULT_MSD, help=f"MSD hippocampus folder (default {DEFAULT_MSD})")
    p.add_argument("--task-id", type=int, default=1)
    p.add_argument("--without-roi", action="store_true", help="no labelsTr: the ROI mask is generated")
    p.add_argument("--max-cases", type=int, help="only the first N cases (smoke runs)")
    p.set_defaults(func=cmd_make_demo_task)

    p = sub.add_parser("plan-and-preprocess", help="fingerprint, plan and preprocess a task")
    p.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    p.add_argument("-t", "--task", required=True, help="task id (1, 001) or TaskNNN_Name")
    p.add_argument("-tf", type=int, default=1, help="processes for preprocessing (default 1)")
    p.add_argument("-tl", type=int, default=1, help="processes for the fingerprint (default 1)")
    p.set_defaults(func=cmd_plan_and_preprocess)

    p = sub.add_parser("train", help="train one fold (0-4) of a planned task")
    p.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    p.add_argument("configuration", metavar="CONFIG", help="a configuration of plans.json (3d)")
    p.add_argument("task", metavar="TASKID")
    p.add_argument("fold", type=int, metavar="FOLD", choices=range(5))
    p.add_argument("--validation_only", "--validation-only", action="store_true",
                   help="re-run the validation of a trained fold")
    p.add_argument("--epochs", type=int, help="override the planned number of epochs")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="classify a folder of CASE_XXXX.nii.gz images")
    p.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    p.add_argument("-i", "--input", type=Path, required=True, help="flat folder of CASE_XXXX.nii.gz")
    p.add_argument("-s", "--roi", type=Path, help="folder of CASE.nii.gz ROI segmentations")
    p.add_argument("-o", "--output", type=Path, required=True, help="one CASE.json per case")
    p.add_argument("-t", "--task", required=True, help="task id (1, 001) or TaskNNN_Name")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=None, help="folds to ensemble (default: all trained)")
    p.add_argument("-c", "--configuration", default="3d", help="configuration (default 3d)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)
