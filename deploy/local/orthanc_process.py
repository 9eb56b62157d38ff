"""Real DICOM peers as local processes: an Orthanc from the shipped configuration, DCMTK storescp and storescu."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

import httpx
import pyorthanc

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO_ROOT / "orthanc" / "orthanc.json"
PULL_CONFIG = REPO_ROOT / "orthanc" / "orthanc-pull.json"
"""The shipped configuration for pull mode: the same Orthanc without the routing script."""
NODE_MODALITY = "dicom-node"
"""Key of the node under ``DicomModalities`` in the shipped configuration."""

# Debian's DCMTK (storescu, storescp and Orthanc alike) sets TCP_NODELAY on its sockets only
# when this variable is present; without it every instance pays ~50 ms (Nagle + delayed ACK).
DCMTK_ENV = {"TCP_NODELAY": "1"}

_T = TypeVar("_T")


class OrthancHttpError(OSError):
    """Orthanc's REST API answered an error status (``code``), or could not be reached (``code`` None)."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (bound to port 0, then released).

    Parameters
    ----------
    host
        Interface to probe.

    Returns
    -------
    int
        The port number the kernel picked.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Return whether ``port`` can be bound on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(
    host: str,
    port: int,
    deadline_s: float,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until a TCP connection to ``host:port`` succeeds.

    Parameters
    ----------
    host, port
        Where the server listens.
    deadline_s
        Seconds from now after which to give up.
    process
        The server's process, if any: its early exit ends the wait at once.

    Raises
    ------
    TimeoutError
        The port did not accept a connection within ``deadline_s``.
    RuntimeError
        ``process`` exited before the port opened.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} did not open within {deadline_s} s") from None
            time.sleep(0.05)


def wait_until(predicate: Callable[[], _T | None], deadline_s: float, what: str, poll_s: float = 0.1) -> _T:
    """Poll ``predicate()`` until it returns a truthy value, and return that value.

    Parameters
    ----------
    predicate
        Called every ``poll_s`` seconds; a falsy answer (``None``, ``False``, an empty
        collection) means "not yet".
    deadline_s
        Seconds from now after which to give up.
    what
        What is awaited, for the timeout message.
    poll_s
        Pause between two calls.

    Returns
    -------
    _T
        The first truthy value ``predicate`` returned.

    Raises
    ------
    TimeoutError
        ``predicate`` stayed falsy for ``deadline_s`` seconds; the message names ``what``.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(poll_s)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Terminate ``process`` (SIGTERM), wait, and kill it if it outlives ``timeout_s``.

    Parameters
    ----------
    process
        The child to stop; one that has already exited is left as it is.
    timeout_s
        Seconds to wait for it after SIGTERM, and again after SIGKILL.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)


class OrthancProcess:
    """An Orthanc configured from the shipped ``orthanc.json``, on free ports, in ``work_dir``.

    The configuration is rewritten for a test: free HTTP and DICOM ports, storage under
    ``work_dir``, the node modality (where the configuration declares one) pointed at
    ``node_aet@node_host:node_port``, and the Lua
    scripts copied beside it (Orthanc resolves relative ``LuaScripts`` and storage paths
    against the directory of the configuration file). Use as a context manager, or call
    :meth:`start` and :meth:`stop`.

    Parameters
    ----------
    work_dir
        Empty directory for the configuration, scripts, storage and log.
    node_aet, node_host, node_port
        Where the ``dicom-node`` modality points.
    stable_age_s
        Overrides ``StableAge`` (small values keep tests fast).
    overrides
        Further top-level configuration keys to replace.
    config_path
        The configuration to start from.
    http_port, dicom_port
        Ports to use (free ones are chosen when omitted).
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        node_aet: str = "DICOMNODE",
        node_host: str = "127.0.0.1",
        node_port: int = 11112,
        stable_age_s: int | None = None,
        overrides: Mapping[str, Any] | None = None,
        config_path: Path = SHIPPED_CONFIG,
        http_port: int | None = None,
        dicom_port: int | None = None,
    ) -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            raise FileNotFoundError("the Orthanc executable is not on PATH (apt package orthanc)")
        self.binary = binary
        self.work_dir = Path(work_dir)
        self.host = "127.0.0.1"
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.config_file = self.work_dir / "orthanc.json"
        self.log_file = self.work_dir / "orthanc.log"
        self.config = self._rewrite_config(
            json.loads(config_path.read_text(encoding="utf-8")),
            config_dir=config_path.parent,
            node=[node_aet, node_host, node_port],
            stable_age_s=stable_age_s,
            overrides=overrides or {},
        )
        self.aet: str = self.config["DicomAet"]
        self.process: subprocess.Popen[bytes] | None = None
        self._client: pyorthanc.Orthanc | None = None

    def _rewrite_config(
        self,
        config: dict[str, Any],
        *,
        config_dir: Path,
        node: list[str | int],
        stable_age_s: int | None,
        overrides: Mapping[str, Any],
    ) -> dict[str, Any]:
        storage = self.work_dir / "storage"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config["HttpPort"] = self.http_port
        config["DicomPort"] = self.dicom_port
        config["StorageDirectory"] = str(storage)
        config["IndexDirectory"] = str(storage)
        if NODE_MODALITY in config.get("DicomModalities", {}):  # not in the pull configuration
            config["DicomModalities"] = {**config["DicomModalities"], NODE_MODALITY: node}
        if stable_age_s is not None:
            config["StableAge"] = stable_age_s
        for script in config.get("LuaScripts", []):
            shutil.copy2(config_dir / script, self.work_dir / Path(script).name)
        config["LuaScripts"] = [Path(script).name for script in config.get("LuaScripts", [])]
        # A machine without the DICOMweb plugin can still run the routing tests.
        config["Plugins"] = [plugin for plugin in config.get("Plugins", []) if Path(plugin).exists()]
        config.update(overrides)
        return config

    @property
    def base_url(self) -> str:
        """Root of the REST API, without a trailing slash."""
        return f"http://{self.host}:{self.http_port}"

    def start(self, deadline_s: float = 20.0) -> None:
        """Write the configuration, start Orthanc in the foreground and wait for its API.

        Raises
        ------
        RuntimeError
            Orthanc exited during start-up (its log is in the message).
        TimeoutError
            ``GET /system`` did not answer within ``deadline_s``.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                [self.binary, str(self.config_file)],
                cwd=self.work_dir,
                env={**os.environ, **DCMTK_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self._api_ready, deadline_s, f"Orthanc REST API on port {self.http_port}")
            wait_for_port(self.host, self.dicom_port, deadline_s, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"Orthanc did not start: {error}\n{self.log_text()}") from error

    def _api_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.process.returncode}")
        try:
            self.get_json("/system", timeout_s=1.0)
        except OSError:
            return False
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout_s``) and wait for it to exit.

        Waiting matters: Orthanc holds its ports for a few seconds after a kill.
        """
        if self.process is not None:
            stop_process(self.process, timeout_s)
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> OrthancProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is not None:
            self.dump_log()

    # -- log -------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything Orthanc has logged so far."""
        if not self.log_file.exists():
            return ""
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def dump_log(self, stream: TextIO | None = None) -> None:
        """Write the Orthanc log to ``stream`` (standard error by default)."""
        stream = stream or sys.stderr
        print(f"----- Orthanc log ({self.log_file}) -----", file=stream)
        print(self.log_text(), file=stream)

    def lua_lines(self, pattern: str = "") -> list[str]:
        """Lines the Lua scripts printed (``Lua says: ...``) that match the regex ``pattern``."""
        said = [line.split("Lua says: ", 1)[1] for line in self.log_text().splitlines() if "Lua says: " in line]
        return [line for line in said if re.search(pattern, line)]

    def wait_for_lua_lines(self, pattern: str, count: int, deadline_s: float) -> list[str]:
        """Wait until at least ``count`` Lua log lines match ``pattern``; return them."""

        def enough() -> list[str] | None:
            lines = self.lua_lines(pattern)
            return lines if lines and len(lines) >= count else None

        return wait_until(enough, deadline_s, f"{count} Lua log line(s) matching {pattern!r}")

    # -- REST ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None,
        *,
        content_type: str = "application/json",
        timeout_s: float = 30.0,
    ) -> bytes:
        """Send one HTTP request to the REST API (through pyorthanc's client) and return the body.

        The client carries the credentials of the first ``RegisteredUsers`` entry when the
        configuration enables authentication.

        Raises
        ------
        OrthancHttpError
            Orthanc answered with an error status (the message includes its body), or could
            not be reached (an ``OSError``, as a refused connection is).
        """
        if body is None or isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            response = self.client.request(method, self.base_url + path, content=data, headers=headers,
                                           timeout=timeout_s)
        except httpx.TransportError as error:
            raise OrthancHttpError(None, f"{method} {path}: {error}") from None
        if response.status_code >= 400:
            raise OrthancHttpError(response.status_code,
                                   f"{method} {path}: HTTP {response.status_code}: {response.text}")
        return bytes(response.content)

    @property
    def client(self) -> pyorthanc.Orthanc:
        """A pyorthanc client of this Orthanc (with its first registered user when authentication is on)."""
        if self._client is None:
            users = self.config.get("RegisteredUsers") or {}
            user, password = next(iter(users.items())) if self.config.get("AuthenticationEnabled") and users \
                else (None, None)
            # No keep-alive: Orthanc closes idle connections after about a second, and a pooled
            # connection reused after that fails with "Server disconnected without sending a response".
            self._client = pyorthanc.Orthanc(self.base_url, username=user, password=password,
                                             limits=httpx.Limits(max_keepalive_connections=0))
        return self._client

    def get_json(self, path: str, timeout_s: float = 30.0) -> Any:
        """``GET path`` and decode the JSON answer."""
        return json.loads(self.request("GET", path, timeout_s=timeout_s))

    def post(self, path: str, body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = b"") -> Any:
        """``POST path`` and decode the JSON answer (``None`` for an empty one)."""
        answer = self.request("POST", path, body)
        return json.loads(answer) if answer.strip() else None

    def put(self, path: str, body: bytes | str) -> None:
        """``PUT path`` (for example a metadata value)."""
        self.request("PUT", path, body, content_type="text/plain")

    def upload(self, dicom_file: Path) -> Any:
        """Store one DICOM file through ``POST /instances``."""
        return self.post("/instances", dicom_file.read_bytes())

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        return list(self.get_json("/studies"))

    def series(self, study_id: str | None = None) -> list[dict[str, Any]]:
        """Expanded series of one study, or of all studies."""
        if study_id is None:
            return list(self.get_json("/series?expand"))
        return list(self.get_json(f"/studies/{study_id}/series"))

    def instances(self, series_id: str | None = None) -> list[dict[str, Any]]:
        """Expanded instances of one series, or of all series."""
        if series_id is None:
            return list(self.get_json("/instances?expand"))
        return list(self.get_json(f"/series/{series_id}/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/ID/simplified-tags``: keyword -> value."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def metadata(self, level: str, resource_id: str) -> dict[str, str]:
        """All metadata of a resource (``level`` is studies, series or instances)."""
        return dict(self.get_json(f"/{level}/{resource_id}/metadata?expand"))

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Resources whose DICOM UID is ``uid`` (``POST /tools/lookup``)."""
        return list(self.post("/tools/lookup", uid))

    def jobs(self) -> list[dict[str, Any]]:
        """All jobs Orthanc remembers, expanded."""
        return list(self.get_json("/jobs?expand"))


class StoreScpProcess:
    """DCMTK ``storescp`` on a free port: a stand-in for the node that keeps every file.

    Files are written with unique names (``+uf``), so an instance received twice yields two
    files and re-sends can be counted.

    Parameters
    ----------
    out_dir
        Directory for the received files (created if absent).
    aet
        AE title to answer to.
    options
        More storescp options, e.g. ``+tls KEY CERT +cf CA`` for DICOM TLS.
    """

    def __init__(self, out_dir: Path, aet: str = "DICOMNODE", options: Sequence[str] = ()) -> None:
        binary = shutil.which("storescp")
        if binary is None:
            raise FileNotFoundError("storescp is not on PATH (apt package dcmtk)")
        self.binary = binary
        self.out_dir = Path(out_dir)
        self.aet = aet
        self.options = tuple(options)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log_file = self.out_dir.parent / f"storescp-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = 10.0) -> None:
        """Start storescp and wait for its port.

        Raises
        ------
        RuntimeError
            storescp exited or did not listen within ``deadline_s`` (its log is in the message).
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary, "--verbose", "--aetitle", self.aet, "--output-directory", str(self.out_dir),
            "--accept-all", "--unique-filenames", "--filename-extension", ".dcm", *self.options,
            str(self.port),
        ]  # fmt: skip
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, **DCMTK_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.host, self.port, deadline_s, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"storescp did not start: {error}\n{self.log_text()}") from error

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop storescp and wait for it to exit."""
        if self.process is not None:
            stop_process(self.process, timeout_s)

    def __enter__(self) -> StoreScpProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """Everything storescp has logged so far."""
        if not self.log_file.exists():
            return ""
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def received(self) -> list[Path]:
        """Files received so far, oldest first."""
        return sorted(self.out_dir.glob("*.dcm"), key=lambda path: (path.stat().st_mtime_ns, path.name))

    def wait_for_count(self, count: int, deadline_s: float) -> list[Path]:
        """Wait until at least ``count`` files have arrived; return all of them."""

        def enough() -> list[Path] | None:
            files = self.received()
            return files if files and len(files) >= count else None

        return wait_until(enough, deadline_s, f"{count} files in {self.out_dir}")


def run_storescu(
    files_or_dirs: Sequence[Path],
    port: int,
    *,
    called_aet: str = "ORTHANC",
    calling_aet: str = "MODALITY",
    host: str = "127.0.0.1",
    timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
) -> None:
    """C-STORE files (directories are scanned recursively) with DCMTK ``storescu``.

    Raises
    ------
    RuntimeError
        storescu failed; the message holds the end of its output.
    """
    command = [
        "storescu", "--aetitle", calling_aet, "--call", called_aet, "--scan-directories",
        "--recurse", *extra_args, host, str(port), *map(str, files_or_dirs),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        env={**os.environ, **DCMTK_ENV},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu exited with {result.returncode}:\n{result.stderr[-3000:]}")
