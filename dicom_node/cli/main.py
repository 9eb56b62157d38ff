"""The ``dicom-node`` command: the node's own commands, and those installed through entry points."""

from __future__ import annotations

import argparse
from functools import partial
import logging
import signal
import sys
import warnings
import time
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from logging.handlers import RotatingFileHandler
from pathlib import Path

from dicom_node.cli.arguments import add_config_arguments, config_from_args
from dicom_node.cli.ledger_commands import cmd_db_upgrade, cmd_retry, cmd_status
from dicom_node.config import Destination, NodeConfig, NodeSettings, dump_toml, parse_destination
from dicom_node.errors import ConfigError, DeliveryFailed

logger = logging.getLogger("dicom_node")

#: Entry-point group of the commands other packages add to ``dicom-node``.
ENTRY_POINT_GROUP = "dicom_node.commands"
#: The command groups installed commands share: name -> (attribute of the sub-command, help).
SHARED_GROUPS = {"train": ("model", "train a model")}

_Commands = argparse._SubParsersAction  # the type ArgumentParser.add_subparsers() returns


class CommandParsers:
    """Where installed commands add their parsers: the sub-commands of ``dicom-node`` and its shared groups.

    Each entry point of the ``dicom_node.commands`` group is a callable taking one of these; it
    adds its parsers, each with a ``func`` default that runs the command on the parsed
    arguments and returns the exit status.

    Parameters
    ----------
    commands
        The sub-commands of ``dicom-node`` (what ``ArgumentParser.add_subparsers()`` returned).
    """

    def __init__(self, commands: _Commands[argparse.ArgumentParser]) -> None:
        self.commands = commands
        self._groups: dict[str, _Commands[argparse.ArgumentParser]] = {}

    def group(self, name: str) -> _Commands[argparse.ArgumentParser]:
        """Return the sub-commands of a shared group, adding the group on first use.

        Parameters
        ----------
        name
            One of :data:`SHARED_GROUPS` (``train``: ``dicom-node train MODEL ...``).

        Returns
        -------
        argparse._SubParsersAction
            Where to add the group's sub-commands.

        Raises
        ------
        ValueError
            If ``name`` is not a shared group.
        """
        if name not in SHARED_GROUPS:
            raise ValueError(f"{name!r} is not a shared command group (known: {', '.join(SHARED_GROUPS)})")
        if name not in self._groups:
            dest, help_text = SHARED_GROUPS[name]
            group = self.commands.add_parser(name, help=help_text)
            self._groups[name] = group.add_subparsers(dest=dest, required=True)
        return self._groups[name]


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=_LOG_FORMAT, stream=sys.stderr)
    for noisy in ("pynetdicom", "PIL", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom logs each of its warnings to its own logger as well (misc.warn_and_log): the
    # second, raw copy on stderr would only repeat it without time or source.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    logging.captureWarnings(True)  # any other warning goes through the log, with its time


def add_log_file(
    path: Path, *, max_bytes: int = 10_000_000, backup_count: int = 5, key: str = "node.log_file",
) -> None:
    """Log to ``path`` as well as stderr, rotated at ``max_bytes`` keeping ``backup_count`` old files.

    Parameters
    ----------
    path
        The log file (``node.log_file``, or ``--log-file``); its folder is created.
    max_bytes, backup_count
        Rotation: ``path.1`` ... ``path.N`` hold the older lines.
    key
        What the error message names as the source of ``path``.

    Raises
    ------
    ConfigError
        If the file cannot be opened.
    """
    root = logging.getLogger()
    target = str(path.resolve())
    if any(isinstance(h, RotatingFileHandler) and h.baseFilename == target for h in root.handlers):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write {path}: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service.node import Node

    config = config_from_args(args)
    if config.node.log_file is not None:
        add_log_file(config.node.log_file, max_bytes=config.node.log_max_bytes,
                     backup_count=config.node.log_backup_count)
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


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.service.worker import QueueWorker

    config = config_from_args(args)
    worker = QueueWorker(config, args.device, config.node.data_dir)
    worker.serve()
    return 0
def check_tls_files(config: NodeConfig) -> None:
    """Load every TLS certificate and key the configuration names, as serving and sending will.

    Raises
    ------
    ConfigError
        Naming the key whose file is not PEM, or whose key does not match its certificate.
    """
    import ssl

    from dicom_node.receive.association import client_tls_context, server_tls_context

    checks: list[tuple[str, Callable[[], object]]] = []
    if config.node.tls is not None:
        checks.append(("node.tls", partial(server_tls_context, config.node.tls)))
    for name, destination in config.destinations.items():
        if destination.tls:
            checks.append((f"destinations.{name}", partial(client_tls_context, destination)))
    for key, build in checks:
        try:
            build()
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"{key}: the TLS files cannot be used: {exc}") from exc


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicom_node.run.plugins import create_analyses

    config = config_from_args(args)
    create_analyses(config.analyses)
    check_tls_files(config)
    print(dump_toml(config.model_dump(mode="json")), end="")
    # a source that does not answer is reported, not refused: the node falls back to the
    # quiet period for it, and a PACS restarting must not keep the node from starting
    check_sources(config)
    return 0


def check_sources(config: NodeConfig) -> bool:
    """Say on stderr, for each configured source, whether its URL answers; return whether all do."""
    from dicom_node.errors import SourceUnavailable
    from dicom_node.receive.source import OrthancSource

    answering = True
    for name, settings in config.sources.items():
        source = OrthancSource(name, settings)
        try:
            system = source.system()
        except SourceUnavailable as exc:
            print(f"# sources.{name}.url: {settings.url} does not answer: {exc.reason}", file=sys.stderr)
            answering = False
            continue
        finally:
            source.close()
        print(f"# sources.{name}.url: {settings.url} answers: {system.get('Name', 'Orthanc')}"
              f" (AE title {system.get('DicomAet', '?')}, Orthanc {system.get('Version', '?')})",
              file=sys.stderr)
    return answering


def peer_destination(args: argparse.Namespace) -> tuple[Destination, str]:
    """Return the peer of ``echo``/``send`` and our AE title.

    The peer is ``AET@HOST:PORT`` (``+tls``: over DICOM TLS) or the name of a destination of
    ``--config``. Over TLS the certificate, key and CAs are ``--tls-*`` where given, else the
    destination's own, else ``node.tls``'s of ``--config``.

    Raises
    ------
    ConfigError
        An unknown destination name, an unreadable file, or TLS without CA certificates.
    """
    import ssl

    from dicom_node.config import TlsSettings, load_config
    from dicom_node.receive.association import client_tls_context

    config = load_config(args.config) if args.config is not None else None
    if config is not None and args.peer in config.destinations:
        destination = config.destinations[args.peer]
    elif "@" in args.peer or config is None:
        _, table = parse_destination(args.peer)
        destination = Destination(**table).with_tls_defaults(config.node.tls if config else None)
    else:
        raise ConfigError(f"{args.peer!r} is neither AET@HOST:PORT[+tls] nor a destination of "
                          f"{args.config} ({', '.join(sorted(config.destinations)) or 'none defined'})")
    given = {key: path for key, path in (("certificate", args.tls_certificate),
                                         ("private_key", args.tls_private_key),
                                         ("ca_certificates", args.tls_ca_certificates))
             if path is not None}
    try:
        TlsSettings(**given)  # the files exist, and certificate and key go together
    except ValueError as exc:
        raise ConfigError(f"--tls-*: {exc}") from None
    if given:
        destination = destination.model_copy(update=given)
    if destination.tls and destination.ca_certificates is None:
        raise ConfigError(f"{args.peer}: TLS needs CA certificates to check the peer's certificate:"
                          " --tls-ca-certificates, or node.tls.ca_certificates in --config")
    if destination.tls:
        try:
            client_tls_context(destination)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"{args.peer}: the TLS files cannot be used: {exc}") from exc
    calling = args.calling_ae or (config.node.ae_title if config else NodeSettings().ae_title)
    return destination, calling


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.deliver.sender import echo
    from dicom_node.status import describe

    destination, calling = peer_destination(args)
    code = echo(destination, calling_ae_title=calling)
    print(f"C-ECHO {args.peer}: {describe(code)}")
    return 0 if code == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node.deliver.sender import send_files
    from dicom_node.receive.files import iter_files

    destination, calling = peer_destination(args)
    files = [file for path in args.paths for file in iter_files(path)]
    if not files:
        print("no files to send", file=sys.stderr)
        return 1
    start = time.perf_counter()
    stored = send_files(files, destination, calling_ae_title=calling)
    print(f"sent {len(stored)} instance(s) to {args.peer} in {time.perf_counter() - start:.2f} s")
    return 0


def installed_commands() -> list[EntryPoint]:
    """Return the entry points of the ``dicom_node.commands`` group, in name order."""
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda entry: entry.name)


def mount_commands(parsers: CommandParsers, commands: Iterable[EntryPoint]) -> list[str]:
    """Let each installed command add its parsers.

    Parameters
    ----------
    parsers
        Where they add them.
    commands
        Entry points of the ``dicom_node.commands`` group.

    Returns
    -------
    list[str]
        One line per entry point that could not be loaded or failed to add its parsers,
        naming it and saying why; the others are mounted all the same.
    """
    problems: list[str] = []
    for entry in commands:
        try:
            entry.load()(parsers)
        except Exception as exc:  # a broken package must not take the node's own commands down
            problems.append(f"the commands of entry point {entry.name!r} ({entry.value}) are not"
                            f" available: {type(exc).__name__}: {exc}")
    return problems


def build_parser(commands: Iterable[EntryPoint] | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of the ``dicom-node`` command.

    Parameters
    ----------
    commands
        The installed commands to mount (default: :func:`installed_commands`). One that fails
        is reported on stderr and left out.

    Returns
    -------
    argparse.ArgumentParser
        The node's own commands, then the installed ones.
    """
    parser = argparse.ArgumentParser(prog="dicom-node", description="An AI node for hospital imaging networks: receive DICOM studies, analyse them, file the results back to the PACS.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-file", type=Path, metavar="PATH",
                        help="also log to this file, rotated at 10 MB (serve: node.log_file)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node: receive, analyse, send")
    add_config_arguments(p)
    p.add_argument("--run-analyses", action="store_true",
                   help="scaled out (state.backend = postgresql): also run analyses on this host,"
                        " one worker per device of workers.device (queue.serve_runs_analyses);"
                        " on one box the node always runs them")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="take jobs from the PostgreSQL queue and run them on one device")
    add_config_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("check-config", help="validate a configuration and print the effective one")
    add_config_arguments(p)
    p.set_defaults(func=cmd_check_config)

    node_name = NodeSettings().ae_title
    for name, func, help_text in (
        ("echo", cmd_echo, "C-ECHO a DICOM peer"),
        ("send", cmd_send, "C-STORE files or folders to a DICOM peer"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("peer", metavar="AET@HOST:PORT[+tls]|DESTINATION",
                       help="the peer, +tls over DICOM TLS; or a destination of --config")
        p.add_argument("--calling-ae", help=f"our AE title (default node.ae_title of --config, "
                                            f"else {node_name})")
        p.add_argument("--config", "-c", type=Path,
                       help="node configuration: its destinations, node.ae_title and node.tls files")
        p.add_argument("--tls-certificate", type=Path, metavar="PEM",
                       help="our certificate over TLS (default: the destination's, else node.tls's)")
        p.add_argument("--tls-private-key", type=Path, metavar="PEM", help="its private key")
        p.add_argument("--tls-ca-certificates", type=Path, metavar="PEM",
                       help="the CAs that must have signed the peer's certificate")
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

    db = sub.add_parser("db", help="the ledger database").add_subparsers(dest="db_command", required=True)
    p = db.add_parser("upgrade", help="create the ledger's schema or migrate it to this version")
    add_config_arguments(p)
    p.set_defaults(func=cmd_db_upgrade)

    for problem in mount_commands(CommandParsers(sub), installed_commands() if commands is None else commands):
        print(f"dicom-node: {problem}", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        if args.log_file is not None:
            add_log_file(args.log_file, key="--log-file")
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except DeliveryFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
