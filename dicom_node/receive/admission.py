"""Who gets a connection and an association slot: pending and per-address bounds, waits, refusals.

A connection is *pending* from the moment it is accepted until its A-ASSOCIATE-RQ is complete;
then it takes an association slot until it closes. Pending connections never hold slots: they
are bounded separately (``node.max_pending_connections``, ``node.max_connections_per_address``)
and, at a bound, the oldest idle pending one makes room for the newcomer (from the address with
the most pending connections), so a peer that connects and says nothing cannot keep a real
sender out, and one that is sending its request is not dropped for a newcomer. pynetdicom reads an accepted socket without a
timeout; the gate gives each one a read timeout and closes pending connections that have not
completed their request in ``node.association_request_timeout_s`` (a peer trickling one byte at
a time would defeat a read timeout alone).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pynetdicom.association import Association

from dicom_node.config import NodeSettings

__all__ = ["AdmissionGate", "RateLimitedLog", "calling_ae_title"]

logger = logging.getLogger(__name__)

#: pynetdicom's DUL loop sleeps this long between polls of a pending connection's socket: a
#: request waits at most this long to be read, and 64 silent peers cost about 1,300 wake-ups a
#: second instead of 64,000 (pynetdicom's 1 ms); 66 of them measured 4-8% of a core.
PENDING_LOOP_DELAY_S = 0.05

#: pynetdicom's own timeouts on a pending connection (socket read, ACSE) fire this much later
#: than the gate's check, which runs at least every second: they are backstops, and a
#: connection the gate closes is logged and counted once, with the node's reason.
BACKSTOP_S = 2.0


def calling_ae_title(assoc: Association) -> str:
    """Return the Calling AE Title of a received A-ASSOCIATE-RQ (pynetdicom sets
    ``requestor.ae_title`` only after the ``EVT_REQUESTED`` handlers ran)."""
    primitive = assoc.requestor.primitive
    return str(primitive.calling_ae_title).strip() if primitive is not None else ""


class RateLimitedLog:
    """At most one WARNING per key and interval; the lines held back are counted in the next one.

    Parameters
    ----------
    interval_s
        Seconds between two lines with the same key.
    clock
        Returns monotonic seconds; injected so tests control it.
    """

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log ``message % args`` at WARNING unless a line with ``key`` went out recently."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] += 1
                return
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            message += " (%d more like this in the last %g s)"
            args = (*args, held, self.interval_s)
        logger.warning(message, *args)


#: A pending connection that received bytes this recently is sending its request: it is not
#: displaced to make room for a newcomer (which has sent nothing yet).
PROGRESS_WINDOW_S = 1.0

_SETTING = {"address_limit": "node.max_connections_per_address",
            "pending_limit": "node.max_pending_connections"}

#: Offsets in Linux's ``struct tcp_info`` (linux/tcp.h): ms since data last arrived (since 2.6),
#: bytes received (since 4.1).
_TCPI_LAST_DATA_RECV = 52
_TCPI_BYTES_RECEIVED = 128


@dataclass
class _Pending:
    assoc: Association
    address: str
    opened: float


def seconds_since_data(assoc: Association) -> float | None:
    """Return how long ago the kernel last received data on an association's socket.

    Read from ``TCP_INFO`` (pynetdicom may already have consumed the bytes, so they cannot
    be peeked at). ``None`` when nothing was ever received, or the platform does not tell.
    """
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, 256)
    except OSError:  # closed meanwhile
        return None
    if len(info) < _TCPI_BYTES_RECEIVED + 8 or not struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]:
        return None
    return float(struct.unpack_from("I", info, _TCPI_LAST_DATA_RECV)[0]) / 1000.0


def _progressing(pending: _Pending) -> bool:
    since = seconds_since_data(pending.assoc)
    return since is not None and since < PROGRESS_WINDOW_S


def _oldest_idle(candidates: Iterable[_Pending]) -> _Pending | None:
    idle = [p for p in candidates if not _progressing(p)]
    return min(idle, key=lambda p: p.opened) if idle else None


def close_socket(assoc: Association) -> None:
    """Shut an association's socket down; wakes a thread blocked in ``recv`` (a close would not)."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed meanwhile
        pass


def set_read_timeout(assoc: Association, timeout_s: float) -> None:
    """Give an association's socket a read timeout (pynetdicom leaves accepted sockets without one)."""
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.settimeout(timeout_s)


class AdmissionGate:
    """Bounds connections and association slots of one Storage SCP.

    Parameters
    ----------
    settings
        The ``[node]`` section: ``max_associations``, ``max_pending_connections``,
        ``max_connections_per_address``, ``association_wait_s``,
        ``association_request_timeout_s`` and ``network_timeout_s``.
    on_refused
        Called with a reason (``association_limit``, ``address_limit``, ``pending_limit``,
        ``request_timeout``) whenever a connection is refused or closed; feeds ``/metrics``.
    """

    def __init__(self, settings: NodeSettings, on_refused: Callable[[str], None]) -> None:
        self.settings = settings
        self.on_refused = on_refused
        self.log = RateLimitedLog()
        self._lock = threading.Condition()
        self._pending: dict[Association, _Pending] = {}
        self._established: dict[Association, str] = {}
        #: Associations closed by the gate, so pynetdicom's complaint about them is not logged again.
        self.closed_by_gate: weakref.WeakSet[Association] = weakref.WeakSet()

    # -- connection life cycle ------------------------------------------------------------

    def open(self, assoc: Association, address: str) -> None:
        """Admit a new connection as pending, displacing an idle pending one at a bound.

        At ``node.max_connections_per_address`` the oldest idle pending connection from the
        same address makes room; at ``node.max_pending_connections`` the oldest idle one from
        the address with the most pending connections does, so a flood from one address
        displaces its own connections before anyone else's. A connection that received
        request bytes in the last :data:`PROGRESS_WINDOW_S` is never displaced: when no idle
        one is left, the newcomer is refused instead.
        """
        set_read_timeout(assoc, self.settings.association_request_timeout_s + BACKSTOP_S)
        assoc.dul._run_loop_delay = PENDING_LOOP_DELAY_S
        displaced: list[tuple[_Pending, str]] = []
        refused: str | None = None
        with self._lock:
            newcomer = _Pending(assoc, address, time.monotonic())
            self._pending[assoc] = newcomer
            from_address = [p for p in self._pending.values() if p.address == address]
            established = sum(1 for a in self._established.values() if a == address)
            if len(from_address) + established > self.settings.max_connections_per_address:
                victim = _oldest_idle(p for p in from_address if p is not newcomer)
                if victim is not None:
                    displaced.append((victim, "address_limit"))
                    del self._pending[victim.assoc]
                else:
                    refused = "address_limit"
            if refused is None and len(self._pending) > self.settings.max_pending_connections:
                per_address = Counter(p.address for p in self._pending.values())
                idle = [p for p in self._pending.values() if p is not newcomer and not _progressing(p)]
                if idle:
                    victim = min(idle, key=lambda p: (-per_address[p.address], p.opened))
                    displaced.append((victim, "pending_limit"))
                    del self._pending[victim.assoc]
                else:
                    refused = "pending_limit"
            if refused is not None:
                del self._pending[assoc]
                self.closed_by_gate.add(assoc)
            for pending, _ in displaced:
                self.closed_by_gate.add(pending.assoc)
        for pending, reason in displaced:
            self.on_refused(reason)
            self.log.warning(f"{reason}:{pending.address}",
                             "closed pending connection from %s, open %.1f s without a complete "
                             "A-ASSOCIATE-RQ and idle, to make room for a new one (%s)",
                             pending.address, time.monotonic() - pending.opened, _SETTING[reason])
            close_socket(pending.assoc)
        if refused is not None:
            self.on_refused(refused)
            self.log.warning(f"{refused}:{address}",
                             "refused connection from %s: %s, every one associated or still "
                             "sending its request (%s)", address,
                             f"{self.settings.max_connections_per_address} connection(s) from that "
                             "address" if refused == "address_limit" else
                             f"{self.settings.max_pending_connections} pending connections",
                             _SETTING[refused])
            close_socket(assoc)

    def request_complete(self, assoc: Association) -> bool:
        """Give a connection whose A-ASSOCIATE-RQ is complete an association slot.

        At ``node.max_associations`` the request waits up to ``node.association_wait_s`` for a
        slot to come free (a burst of senders is served in turn, not refused).

        Returns
        -------
        bool
            ``True`` with a slot taken; ``False`` when none came free in time (the caller
            rejects the association, transient, local limit exceeded).
        """
        address = assoc.requestor.address
        deadline = time.monotonic() + self.settings.association_wait_s
        with self._lock:
            self._pending.pop(assoc, None)
            while len(self._established) >= self.settings.max_associations:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            else:
                self._established[assoc] = address
                set_read_timeout(assoc, self.settings.network_timeout_s)
                return True
        self.on_refused("association_limit")
        self.log.warning(f"association_limit:{address}",
                         "rejected association from %s (AE %s): all %d association slots busy "
                         "for %g s (node.max_associations, node.association_wait_s)",
                         address, calling_ae_title(assoc), self.settings.max_associations,
                         self.settings.association_wait_s)
        return False

    def closed(self, assoc: Association) -> None:
        """Forget a connection (rejected, aborted or closed) and free its slot."""
        with self._lock:
            self._pending.pop(assoc, None)
            if self._established.pop(assoc, None) is not None:
                self._lock.notify()

    def close_stalled(self) -> None:
        """Close pending connections older than ``node.association_request_timeout_s``."""
        limit_s = self.settings.association_request_timeout_s
        now = time.monotonic()
        with self._lock:
            stalled = [p for p in self._pending.values() if now - p.opened > limit_s]
            for pending in stalled:
                del self._pending[pending.assoc]
                self.closed_by_gate.add(pending.assoc)
        for pending in stalled:
            self.on_refused("request_timeout")
            self.log.warning(f"request_timeout:{pending.address}",
                             "closed connection from %s: no complete A-ASSOCIATE-RQ within %g s "
                             "(node.association_request_timeout_s)", pending.address, limit_s)
            close_socket(pending.assoc)

    def counts(self) -> tuple[int, int]:
        """Return (pending connections, associations holding a slot)."""
        with self._lock:
            return len(self._pending), len(self._established)
