"""The whole stack as plain processes: Orthanc (Debian), the node, and OHIF behind its same-origin proxy.

What ``deploy/docker-compose.yml`` runs as containers, for machines without Docker, and for the
tests. Run it from the repository root (after ``scripts/fetch-ohif.sh``)::

    .venv/bin/python -m deploy.local.stack            # Ctrl-C stops everything

It prints the OHIF, Orthanc and DICOM addresses; store studies into Orthanc with ``storescu``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `deploy` importable
    sys.path.insert(0, str(REPO_ROOT))

from dicom_node.config import merge  # noqa: E402
from deploy.local.node_process import NodeProcess  # noqa: E402
from deploy.local.ohif_proxy import DEFAULT_APP_CONFIG, DEFAULT_WEB_ROOT, OhifProxyServer  # noqa: E402
from deploy.local.orthanc_process import OrthancProcess, free_port, port_is_free  # noqa: E402


class LocalStack:
    """Orthanc routing to the node, and OHIF reading from Orthanc, on 127.0.0.1.

    Parameters
    ----------
    work_dir
        Holds ``orthanc/`` (configuration, storage, log) and ``node/`` (configuration, data, log).
    orthanc_http_port, orthanc_dicom_port, node_port, ohif_port
        Ports (free ones when omitted).
    stable_age_s
        Orthanc's ``StableAge`` (the shipped 10 s when omitted).
    node_config
        Configuration merged over the node's defaults (see :class:`NodeProcess`).
    web_root, app_config
        The OHIF bundle and the ``app-config.js`` served in place of its own.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        orthanc_http_port: int | None = None,
        orthanc_dicom_port: int | None = None,
        node_port: int | None = None,
        ohif_port: int | None = None,
        stable_age_s: int | None = None,
        node_config: dict[str, Any] | None = None,
        web_root: Path = DEFAULT_WEB_ROOT,
        app_config: Path = DEFAULT_APP_CONFIG,
    ) -> None:
        self.work_dir = Path(work_dir)
        node_port = node_port or free_port()
        self.orthanc = OrthancProcess(
            self.work_dir / "orthanc", node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port,
            stable_age_s=stable_age_s, http_port=orthanc_http_port, dicom_port=orthanc_dicom_port,
        )
        config = {"node": {"allowed_calling_ae_titles": [self.orthanc.aet]}}
        self.node = NodeProcess(
            self.work_dir / "node", port=node_port,
            destinations={"pacs": (self.orthanc.aet, "127.0.0.1", self.orthanc.dicom_port)},
            config=merge(config, node_config or {}),
        )
        self._ohif_port = ohif_port or 0
        self._web_root = web_root
        self._app_config = app_config
        self.ohif: OhifProxyServer | None = None

    @property
    def ohif_url(self) -> str:
        """The viewer's address (the stack must be started)."""
        if self.ohif is None:
            raise RuntimeError("the stack is not started")
        return self.ohif.url

    def start(self) -> None:
        """Start Orthanc, then the viewer's proxy, then the node (it loads its models); on failure stop all."""
        try:
            self.orthanc.start()
            self.ohif = OhifProxyServer(("127.0.0.1", self._ohif_port), orthanc_url=self.orthanc.base_url,
                                        web_root=self._web_root, app_config=self._app_config)
            self.ohif.start()
            self.node.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the node (it drains), the proxy and Orthanc, each waited for."""
        self.node.stop()
        if self.ohif is not None:
            self.ohif.stop()
            self.ohif = None
        self.orthanc.stop()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port(preferred: int) -> int:
    return preferred if port_is_free(preferred) else free_port()


def main(argv: list[str] | None = None) -> int:
    """Run the stack until Ctrl-C or SIGTERM (``python -m deploy.local.stack``).

    Parameters
    ----------
    argv
        Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns
    -------
    int
        The exit status: 0 once stopped.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".stack")
    parser.add_argument("--ohif-port", type=int, default=3000)
    parser.add_argument("--stable-age-s", type=int, default=None, help="Orthanc StableAge (default: the shipped 10 s)")
    args = parser.parse_args(argv)
    stack = LocalStack(args.work_dir, orthanc_http_port=_port(8042), orthanc_dicom_port=_port(4242),
                       node_port=_port(11112), ohif_port=_port(args.ohif_port), stable_age_s=args.stable_age_s)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    print("Starting Orthanc, the OHIF proxy and dicom-node (loading its models)...")
    try:
        stack.start()
        print(f"OHIF viewer:  {stack.ohif_url}/")
        print(f"Orthanc:      {stack.orthanc.base_url}/app/explorer.html")
        print(f"Send studies: TCP_NODELAY=1 storescu -aec {stack.orthanc.aet} 127.0.0.1 "
              f"{stack.orthanc.dicom_port} +sd FOLDER")
        print(f"Node:         {stack.node.ae_title}@127.0.0.1:{stack.node.port}, log {stack.node.log_file}")
        print("Running; press Ctrl-C to stop.")
        stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("Stopping...")
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
