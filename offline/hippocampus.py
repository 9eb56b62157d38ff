"""The ``train hippocampus`` command: reproduce the shipped hippocampus weights from MSD Task04."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.cli.main import CommandParsers


def cmd_train_hippocampus(args: argparse.Namespace) -> int:
    """Train the hippocampus U-Net and print its metrics."""
    from inference.hippocampus.train import train

    metrics = train(args.data, args.out, epochs=args.epochs, seed=args.seed, device=args.device,
                    progress=lambda line: print(line, flush=True), max_cases=args.max_cases,
                    num_threads=args.threads or None, batch_size=args.batch_size,
                    learning_rate=args.learning_rate)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def add_parsers(parsers: CommandParsers) -> None:
    """Add ``train hippocampus`` to the ``dicom-node`` command (a ``dicom_node.commands`` entry point).

    Parameters
    ----------
    parsers
        Where ``dicom-node`` takes its installed commands.
    """
    p = parsers.group("train").add_parser("hippocampus", help="train the hippocampus U-Net on MSD Task04")
    p.add_argument("--data", type=Path, default=Path("../shared/data/hippocampus-msd"))
    p.add_argument("--out", type=Path, default=Path("inference/hippocampus/weights/hippocampus_unet3d.pt"))
    p.add_argument("--epochs", type=int, default=75, help="default: as the shipped weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--max-cases", type=int, help="use only the first N training cases (smoke runs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.set_defaults(func=cmd_train_hippocampus)
