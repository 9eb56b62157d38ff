"""A dicom-node ``serve`` process configured in a work directory, started and stopped like a service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dicom_node.config import build_config, dump_toml, merge
from dicom_node.state.ledger import Ledger, open_ledger

REPO_ROOT = Path(__file__).resolve().parents[2]


class NodeProcess:
    """``dicom-node serve`` in its own process, with a configuration written to ``work_dir``.

    Parameters
    ----------
    work_dir
        Holds ``node.toml``, ``node.log`` and the data directory ``data/``.
    port
        DICOM port of the node.
    destinations
        ``{name: (ae_title, host, port)}`` where results go.
    config
        Further configuration merged over the defaults written here.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        port: int,
        destinations: dict[str, tuple[str, str, int]],
        config: dict[str, Any] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.data_dir = self.work_dir / "data"
        self.config_file = self.work_dir / "node.toml"
        self.log_file = self.work_dir / "node.log"
        base: dict[str, Any] = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port,
                     "data_dir": str(self.data_dir), "min_free_disk_bytes": 0},
            "grouping": {"quiet_period_s": 1.0, "max_wait_s": 120.0},
            "workers": {"device": "cpu", "cpu_workers": 1, "job_timeout_s": 120.0},
            "delivery": {"retry_initial_s": 1.0, "retry_max_s": 5.0, "max_attempts": 20,
                         "timeout_s": 20.0},
            "destinations": {
                name: {"ae_title": aet, "host": host, "port": dport}
                for name, (aet, host, dport) in destinations.items()
            },
        }
        self.config = merge(base, config or {})
        self.config_file.write_text(dump_toml(self.config), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None
        self._ledger: Ledger | None = None

    @property
    def ae_title(self) -> str:
        """The node's AE title, as configured."""
        return str(self.config["node"]["ae_title"])

    def start(self, deadline_s: float = 120.0) -> None:
        """Start the node and wait until it accepts associations (its models are loaded).

        Parameters
        ----------
        deadline_s
            Seconds to wait for the node's ``serving on`` log line.

        Raises
        ------
        RuntimeError
            The node exited during start-up (its log is in the message).
        TimeoutError
            The node did not serve within ``deadline_s``; it is killed.
        """
        offset = len(self.log_text())  # a restart appends to the same log
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + deadline_s
        marker = "serving on"
        while marker not in self.log_text()[offset:]:
            if self.process.poll() is not None:
                raise RuntimeError(f"dicom-node exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()  # never leave a half-started node behind
                raise TimeoutError(f"dicom-node did not start within {deadline_s} s:\n{self.log_text()}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Stop gracefully (SIGTERM), kill after ``timeout_s``; return the exit code.

        Parameters
        ----------
        timeout_s
            Seconds the node may take to drain before it is killed.

        Returns
        -------
        int or None
            The node's exit status; ``None`` if it was never started.
        """
        if self._ledger is not None:
            self._ledger.close()  # a PostgreSQL ledger holds a pool of connections
            self._ledger = None
        return terminate(self.process, timeout_s)

    def kill(self) -> None:
        """``kill -9`` the node and its workers, as a power cut would."""
        kill_tree(self.process)

    def log_text(self) -> str:
        """Everything the node has logged so far, across restarts."""
        return self.log_file.read_text(encoding="utf-8", errors="replace") if self.log_file.exists() else ""

    def ledger(self) -> Ledger:
        """The node's ledger, opened on first use and closed by :meth:`stop`.

        Either backend may be read while the node runs (SQLite WAL, PostgreSQL); a
        PostgreSQL password comes from the environment, as the node's does.
        """
        if self._ledger is None:
            config = build_config(self.config)
            self._ledger = open_ledger(config.node.data_dir, config.state)
        return self._ledger

    def __enter__(self) -> NodeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()



def terminate(process: subprocess.Popen[bytes] | None, timeout_s: float) -> int | None:
    """SIGTERM ``process``, SIGKILL it after ``timeout_s``; return its exit code (``None``: never started)."""
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=10)


def kill_tree(process: subprocess.Popen[bytes] | None) -> None:
    """``kill -9`` ``process`` and its children, as a power cut would."""
    if process is not None and process.poll() is None:
        children = _children(process.pid)
        process.kill()
        process.wait(timeout=10)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

def _children(pid: int) -> list[int]:
    """Return the pids of a process' children (its workers), read from /proc."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found.append(int(entry.name))
    return found
