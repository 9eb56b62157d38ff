"""Command-line options shared by the node's commands: the configuration file and its overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig, build_config, load_config, merge, parse_destination


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="node configuration (TOML)")
    parser.add_argument("--ae-title", help="the node's AE title (node.ae_title)")
    parser.add_argument("--port", type=int, help="DICOM port to listen on (node.port)")
    parser.add_argument("--data-dir", type=Path, help="spool, ledger and results (node.data_dir)")
    parser.add_argument(
        "--destination", action="append", default=[], metavar="AET@HOST:PORT[+tls]",
        help="send results there, +tls over DICOM TLS with node.tls's files (repeatable; adds to "
             "[destinations])",
    )


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Build the effective configuration: the file (if any), then the command-line overrides."""
    overrides: dict[str, Any] = {"node": {}}
    if args.ae_title:
        overrides["node"]["ae_title"] = args.ae_title
    if args.port is not None:
        overrides["node"]["port"] = args.port
    if args.data_dir is not None:
        overrides["node"]["data_dir"] = str(args.data_dir)
    if getattr(args, "run_analyses", False):
        overrides["queue"] = {"serve_runs_analyses": True}
    for text in args.destination:
        name, table = parse_destination(text)
        overrides.setdefault("destinations", {})[name] = table
    if args.config is not None:
        return load_config(args.config, overrides)
    return build_config(merge({}, overrides), source="command line")
