"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb + pg_ctl on a free port in a temporary folder.

Never the system service. ``initdb`` refuses to run as root, so as root the cluster is
created and run as the ``postgres`` user in a folder that user owns. TCP connections need
a password (scram-sha-256), so the password path of the node is exercised too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
PASSWORD = "test-secret-Ω"


def binaries() -> Path | None:
    """Return the folder holding initdb and pg_ctl, or ``None`` when PostgreSQL is absent."""
    for folder in BIN_DIRS:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    return None


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or ``None`` when they can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'dicom-node[postgresql]')"
    if binaries() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """A running cluster: connect as ``user`` with ``password`` on 127.0.0.1:``port``."""

    folder: Path
    port: int
    bin_dir: Path
    user: str = "postgres"
    password: str = PASSWORD

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its dsn (without the password)."""
        import psycopg

        with psycopg.connect(self.dsn(), password=self.password, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def pg_ctl(self, *args: str, timeout_s: float = 60) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data"), *args]
        subprocess.run(_as_postgres(command), check=True, capture_output=True, timeout=timeout_s)

    def _server_arguments(self) -> list[str]:
        # -l: the server's output goes to a file, never to pipes a caller waits on
        options = (f"-c port={self.port} -c listen_addresses=127.0.0.1"
                   f" -c unix_socket_directories={self.folder} -c fsync=off -c max_connections=100")
        return ["-w", "-l", str(self.folder / "server.log"), "-o", options]

    def start(self) -> None:
        """Start the server (again) on its port and wait until it accepts connections."""
        self.pg_ctl("start", *self._server_arguments())
        self.wait_ready()

    def restart_immediately(self) -> None:
        """``pg_ctl restart -m immediate``: as a crash of the database server, then back up."""
        self.pg_ctl("restart", "-m", "immediate", *self._server_arguments())
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.dsn(), password=self.password, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Start a fresh cluster on a free port; stop it and delete its folder afterwards."""
    bin_dir = binaries()
    assert bin_dir is not None
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    folder.chmod(0o700)
    pwfile = folder / "pw"
    pwfile.write_text(PASSWORD + "\n", encoding="utf-8")
    if os.geteuid() == 0:
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    port = free_port()
    cluster = Cluster(folder, port, bin_dir)
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "postgres",
                      "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                      "--encoding=UTF8", "--no-sync"]),
        check=True, capture_output=True, timeout=120,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
