"""The node's Storage SCP alone, storing into a spool and ledger, with or without its completeness
check or over DICOM TLS: the variants ``benchmarks.receive_throughput`` compares in one run.

Run: ``python -m benchmarks.scp_receiver PORT WORK_DIR [--no-structure-check] [--tls CERT KEY CA]``.
``--no-structure-check`` replaces the structural walk (``receive/structure.py``) by nothing, in
this process only, to measure what the check costs; the node itself always checks.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.config import NodeSettings, TlsSettings  # noqa: E402
from dicom_node.receive import scp as scp_module  # noqa: E402
from dicom_node.receive.spool import Spool  # noqa: E402
from dicom_node.state.sqlite import SqliteLedger  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("work", type=Path)
    parser.add_argument("--no-structure-check", action="store_true")
    parser.add_argument("--tls", nargs=3, type=Path, metavar=("CERT", "KEY", "CA"))
    args = parser.parse_args()
    if args.no_structure_check:
        scp_module.check_structure = lambda *_args, **_kwargs: None
    tls = None
    if args.tls:
        certificate, private_key, ca = args.tls
        tls = TlsSettings(certificate=certificate, private_key=private_key, ca_certificates=ca,
                          require_client_certificate=True)
    settings = NodeSettings(ae_title="NODESCP", host="127.0.0.1", port=args.port, data_dir=args.work,
                            min_free_disk_bytes=0, tls=tls)
    scp = scp_module.StorageSCP(settings, Spool(args.work / "spool"), SqliteLedger(args.work / "ledger.sqlite3"))
    scp.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
