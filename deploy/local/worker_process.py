"""A ``dicom-node worker`` process with its own data folder, started, stopped and killed like a worker host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.local.node_process import REPO_ROOT, kill_tree


class WorkerProcess:
    """``dicom-node worker --config FILE --data-dir DIR --device DEVICE``, logging to ``DIR/worker.log``.

    Parameters
    ----------
    config_file
        The node's configuration (the same file as the receiving node's).
    data_dir
        This worker's own data folder.
    device
        ``cpu`` or ``cuda:N``.
    """

    def __init__(self, config_file: Path, data_dir: Path, device: str = "cpu") -> None:
        self.config_file = config_file
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.log_file = self.data_dir / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = 120.0) -> None:
        """Start the worker and wait until it takes jobs (its models are loaded).

        Raises
        ------
        RuntimeError
            The worker exited during start-up (its log is in the message).
        TimeoutError
            It did not get ready within ``deadline_s``; it is killed.
        """
        offset = len(self.log_text())
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(self.config_file),
             "--data-dir", str(self.data_dir), "--device", self.device],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + deadline_s
        while "taking jobs from" not in self.log_text()[offset:]:
            if self.process.poll() is not None:
                raise RuntimeError(f"dicom-node worker exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"dicom-node worker not ready within {deadline_s} s:\n{self.log_text()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def log_text(self) -> str:
        """Everything the worker logged so far, across restarts."""
        return self.log_file.read_text(encoding="utf-8", errors="replace") if self.log_file.exists() else ""

    def kill(self) -> None:
        """``kill -9`` the worker and its model process, as a host that vanishes would."""
        kill_tree(self.process)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the current job finishes), kill after ``timeout_s``; return the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait(timeout=10)
