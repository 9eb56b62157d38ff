"""The universal classifier's console scripts as AUC23 users call them: uc_plan_and_preprocess, uc_train, uc_predict.

Each builds the arguments of the matching ``dicom-node classifier`` command and runs it:
``uc_plan_and_preprocess DATA -t ID [ID ...] -tf N -tl N``, ``uc_train DATA 3d_fullres
ClassifierTrainer TASKID FOLD [--validation_only]``, ``uc_predict DATA -i IN -s ROI -o OUT -t ID
-f 0 1 2 3 4``. ``3d_fullres`` is the one configuration these classifiers plan (``3d`` here).
DATA is either layout (``inference.classifier.dataset.task_roots``); the nnU-Net variables
``nnUNet_raw_data_base``, ``nnUNet_preprocessed`` and ``RESULTS_FOLDER``, where set, replace its
folders, as they do for the original scripts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from inference.classifier.dataset import TaskRoots, task_roots
from offline.classifier import cmd_plan_and_preprocess, cmd_predict, cmd_train

logger = logging.getLogger(__name__)

#: Configuration names of the original scripts -> the planned configuration here.
CONFIGURATIONS = {"3d_fullres": "3d", "3d": "3d"}
#: The trainer class name the original scripts take; the only one there is.
TRAINER = "ClassifierTrainer"


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _roots(data_root: Path) -> TaskRoots:
    """Resolve DATA with the nnU-Net variables of this process's environment, and log the folders."""
    roots = task_roots(data_root, os.environ)
    logger.info("raw tasks in %s, preprocessed in %s, trained models in %s", roots.raw, roots.preprocessed,
                roots.results)
    return roots


def _usage(function: object) -> str:
    """The first line of a script's docstring as its --help description, without reST quoting."""
    return str(getattr(function, "__doc__", "") or "").split("\n", 1)[0].replace("``", "")


def plan_and_preprocess_main(argv: Sequence[str] | None = None) -> int:
    """``uc_plan_and_preprocess DATA -t ID [ID ...] [-tf N] [-tl N]``: plan and preprocess each task."""
    parser = argparse.ArgumentParser(prog="uc_plan_and_preprocess", description=_usage(plan_and_preprocess_main))
    parser.add_argument("data_root", type=Path, metavar="DATA")
    parser.add_argument("-t", "--task_ids", nargs="+", required=True, metavar="ID", help="task ids or TaskNNN_Name")
    parser.add_argument("-tf", type=int, default=1, help="processes for preprocessing (default 1)")
    parser.add_argument("-tl", type=int, default=1, help="processes for the fingerprint (default 1)")
    args = parser.parse_args(argv)
    _logging()
    roots = _roots(args.data_root)
    for task in args.task_ids:
        status = cmd_plan_and_preprocess(argparse.Namespace(data_root=roots, task=task, tf=args.tf,
                                                            tl=args.tl))
        if status != 0:
            return status
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``uc_train DATA 3d_fullres ClassifierTrainer TASKID FOLD [--validation_only]``: train one fold."""
    parser = argparse.ArgumentParser(prog="uc_train", description=_usage(train_main))
    parser.add_argument("data_root", type=Path, metavar="DATA")
    parser.add_argument("configuration", metavar="CONFIGURATION", help="3d_fullres")
    parser.add_argument("trainer", metavar="TRAINER", help=TRAINER)
    parser.add_argument("task", metavar="TASKID")
    parser.add_argument("fold", type=int, metavar="FOLD", choices=range(5))
    parser.add_argument("--validation_only", "--validation-only", action="store_true",
                        help="re-run the validation of a trained fold")
    parser.add_argument("--epochs", type=int, help="override the planned number of epochs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.configuration not in CONFIGURATIONS:
        parser.error(f"configuration {args.configuration!r} is not one of {', '.join(CONFIGURATIONS)}")
    if args.trainer != TRAINER:
        parser.error(f"trainer {args.trainer!r}: the only trainer is {TRAINER}")
    _logging()
    args.data_root = _roots(args.data_root)
    args.configuration = CONFIGURATIONS[args.configuration]
    return cmd_train(args)


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``uc_predict DATA -i IN -o OUT -t ID [-s ROI] [-f 0 1 2 3 4]``: classify a folder of cases."""
    parser = argparse.ArgumentParser(prog="uc_predict", description=_usage(predict_main))
    parser.add_argument("data_root", type=Path, metavar="DATA")
    parser.add_argument("-i", "--input", type=Path, required=True, help="flat folder of CASE_XXXX.nii.gz")
    parser.add_argument("-s", "--roi", type=Path, help="folder of CASE.nii.gz ROI segmentations")
    parser.add_argument("-o", "--output", type=Path, required=True, help="one CASE.json per case")
    parser.add_argument("-t", "--task", required=True, help="task id or TaskNNN_Name")
    parser.add_argument("-f", "--folds", type=int, nargs="+", help="folds to ensemble (default: all trained)")
    parser.add_argument("-m", "--configuration", default="3d_fullres", help="3d_fullres")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.configuration not in CONFIGURATIONS:
        parser.error(f"configuration {args.configuration!r} is not one of {', '.join(CONFIGURATIONS)}")
    _logging()
    args.data_root = _roots(args.data_root)
    args.configuration = CONFIGURATIONS[args.configuration]
    return cmd_predict(args)
