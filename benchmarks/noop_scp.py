"""A pynetdicom Storage SCP that acknowledges every instance without storing it.

The ceiling of any pynetdicom-based receiver on this machine: the node's own SCP set-up
(contexts, TCP_NODELAY, DUL loop delay) with a C-STORE handler that only answers success.
Used by ``benchmarks.receive_throughput`` as a reference. Run: ``python -m benchmarks.noop_scp PORT``.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from pynetdicom import evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node import status  # noqa: E402
from dicom_node.config import NodeSettings  # noqa: E402
from dicom_node.receive.scp import StorageSCP  # noqa: E402


def main() -> int:
    port = int(sys.argv[1])
    scp = StorageSCP(NodeSettings(ae_title="NOOPSCP", host="127.0.0.1", port=port),
                     spool=None, ledger=None)  # type: ignore[arg-type]
    ae = scp.build_ae()
    handlers = [(evt.EVT_C_STORE, lambda event: status.SUCCESS), (evt.EVT_CONN_OPEN, scp.handle_conn_open),
                (evt.EVT_REQUESTED, scp.handle_requested), (evt.EVT_ACCEPTED, scp.handle_accepted),
                (evt.EVT_CONN_CLOSE, scp.handle_association_ended)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    if server is not None:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
