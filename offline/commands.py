"""The ``analyze`` and ``batch`` commands: the configured analyses on study folders, without a network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import NodeConfig, build_config, load_config
from dicom_node.errors import ConfigError

if TYPE_CHECKING:
    from dicom_node.cli.main import CommandParsers


def offline_config(args: argparse.Namespace) -> NodeConfig:
    """Return the configuration of an offline run: ``--config`` or the defaults, only the ``--analysis`` named.

    Raises
    ------
    ConfigError
        If the file does not validate or an ``--analysis`` is not configured.
    """
    config = load_config(args.config) if args.config else build_config({})
    if args.analysis:
        unknown = set(args.analysis) - set(config.analyses)
        if unknown:
            raise ConfigError(f"unknown analysis: {', '.join(sorted(unknown))}")
        config = config.model_copy(
            update={"analyses": {k: v for k, v in config.analyses.items() if k in args.analysis}}
        )
    return config


def cmd_analyze(args: argparse.Namespace) -> int:
    """Run the configured analyses on one study folder and print the summary; 1 if a job failed."""
    from dicom_node.run.plugins import create_analyses
    from offline.analyze import analyze_study

    config = offline_config(args)
    analyses = create_analyses(config.analyses)
    for analysis in analyses.values():
        analysis.load(args.device)
    summary = analyze_study(args.study, args.out, config, analyses)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


def cmd_batch(args: argparse.Namespace) -> int:
    """Run the configured analyses on many study folders in parallel; 1 if a study failed."""
    from offline.analyze import run_batch

    config = offline_config(args)
    summary = run_batch(args.studies, args.out, config, workers=args.workers, device=args.device)
    print(f"{summary['succeeded']} of {summary['studies']} studies succeeded;"
          f" summary in {args.out / 'summary.json'}")
    return 0 if summary["failed"] == 0 else 1


def add_parsers(parsers: CommandParsers) -> None:
    """Add ``analyze`` and ``batch`` to the ``dicom-node`` command (a ``dicom_node.commands`` entry point).

    Parameters
    ----------
    parsers
        Where ``dicom-node`` takes its installed commands.
    """
    for name, func, help_text in (
        ("analyze", cmd_analyze, "run the analyses on one study folder, offline"),
        ("batch", cmd_batch, "run the analyses on many study folders in parallel"),
    ):
        p = parsers.commands.add_parser(name, help=help_text)
        if name == "analyze":
            p.add_argument("study", type=Path)
        else:
            p.add_argument("studies", type=Path, nargs="+")
            p.add_argument("--workers", "-j", type=int, default=2)
        p.add_argument("--out", "-o", type=Path, required=True)
        p.add_argument("--config", "-c", type=Path)
        p.add_argument("--analysis", "-a", action="append", help="only this analysis (repeatable)")
        p.add_argument("--device", default="cpu")
        p.set_defaults(func=func)
