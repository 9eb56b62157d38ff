"""The ``dicom-node`` command: serve, check-config, echo, send, status, retry, analyze, batch, train, run-csv, convert, classifier."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import (
    NodeConfig,
    build_config,
    dump_toml,
    load_config,
    merge,
    parse_destination,
)
from offline.bodycomp.commands import add_parsers as add_bodycomp_parsers
from offline.classifier import add_parsers as add_classifier_parsers
from offline.convert import add_parsers as add_convert_parsers
from dicom_node.cli.arguments import add_config_arguments, config_from_args
from dicom_node.cli.ledger_commands import cmd_retry, cmd_status
from dicom_node.errors import ConfigError, DeliveryFailed

logger = logging.getLogger("dicom_node")

DEFAULT_DATA_DIR = Path("/var/lib/dicom-node")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "PIL", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service.node import Node

    config = config_from_args(args)
    node = Node(config)
    host, port = node.start()
    logger.info("dicom-node %s serving on %s:%d, data in %s", config.node.ae_title, host, port,
                config.node.data_dir)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: node.request_stop())
    try:
        node.run()
    finally:
        logger.info("stopping: no new associations, draining running jobs")
        node.stop()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicom_node.run.plugins import create_analyses

    config = config_from_args(args)
    create_analyses(config.analyses)
    print(dump_toml(config.model_dump(mode="json")), end="")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.config import Destination
    from dicom_node.deliver.sender import echo
    from dicom_node.status import describe

    _, table = parse_destination(args.peer)
    code = echo(Destination(**table), calling_ae_title=args.calling_ae)
    print(f"C-ECHO {args.peer}: {describe(code)}")
    return 0 if code == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node.config import Destination
    from offline.analyze import iter_dicom_files
    from dicom_node.deliver.sender import send_files

    _, table = parse_destination(args.peer)
    files = iter_dicom_files(args.paths)
    if not files:
        print("no files to send", file=sys.stderr)
        return 1
    start = time.perf_counter()
    stored = send_files(files, Destination(**table), calling_ae_title=args.calling_ae)
    print(f"sent {len(stored)} instance(s) to {args.peer} in {time.perf_counter() - start:.2f} s")
    return 0


def _offline_config(args: argparse.Namespace) -> NodeConfig:
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
    from offline.analyze import analyze_study
    from dicom_node.run.plugins import create_analyses

    config = _offline_config(args)
    analyses = create_analyses(config.analyses)
    for analysis in analyses.values():
        analysis.load(args.device)
    summary = analyze_study(args.study, args.out, config, analyses)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


def cmd_batch(args: argparse.Namespace) -> int:
    from offline.analyze import run_batch

    config = _offline_config(args)
    summary = run_batch(args.studies, args.out, config, workers=args.workers, device=args.device)
    print(f"{summary['succeeded']} of {summary['studies']} studies succeeded;"
          f" summary in {args.out / 'summary.json'}")
    return 0 if summary["failed"] == 0 else 1


def cmd_train_hippocampus(args: argparse.Namespace) -> int:
    from inference.hippocampus.train import train

    metrics = train(args.data, args.out, epochs=args.epochs, seed=args.seed, device=args.device,
                    progress=lambda line: print(line, flush=True), max_cases=args.max_cases,
                    num_threads=args.threads or None, batch_size=args.batch_size,
                    learning_rate=args.learning_rate)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``dicom-node`` command."""
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node: receive, analyse, send")
    add_config_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a configuration and print the effective one")
    add_config_arguments(p)
    p.set_defaults(func=cmd_check_config)

    for name, func, help_text in (
        ("echo", cmd_echo, "C-ECHO a DICOM peer"),
        ("send", cmd_send, "C-STORE files or folders to a DICOM peer"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("peer", metavar="AET@HOST:PORT")
        p.add_argument("--calling-ae", default="DICOMNODE", help="our AE title (default DICOMNODE)")
        if name == "send":
            p.add_argument("paths", nargs="+", type=Path)
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="studies and jobs from the ledger, with failure reasons")
    add_config_arguments(p)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="re-queue a job, or every dead-lettered delivery")
    add_config_arguments(p)
    p.add_argument("job", nargs="?", help="job uid (default: all dead-lettered deliveries)")
    p.set_defaults(func=cmd_retry)

    for name, func, help_text in (
        ("analyze", cmd_analyze, "run the analyses on one study folder, offline"),
        ("batch", cmd_batch, "run the analyses on many study folders in parallel"),
    ):
        p = sub.add_parser(name, help=help_text)
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

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="model", required=True)
    p = train.add_parser("hippocampus", help="train the hippocampus U-Net on MSD Task04")
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
    add_bodycomp_parsers(sub, train)
    add_convert_parsers(sub)
    add_classifier_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except DeliveryFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1

