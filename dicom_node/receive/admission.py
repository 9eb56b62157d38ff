"""Who gets a connection and an association slot: pending and per-address bounds, waits, refusals.

A connection is *pending* from the moment it is accepted until its A-ASSOCIATE-RQ is complete;
then it takes an association slot until it closes. Pending connections never hold slots: they
are bounded separately (``node.max_pending_connections``, ``node.max_connections_per_address``)
and, at a bound, the oldest pending one makes room for the newcomer, so a peer that connects and
says nothing cannot keep a real sender out. pynetdicom reads an accepted socket without a
timeout; the gate gives each one a read timeout and closes pending connections that have not
completed their request in ``node.association_request_timeout_s`` (a peer trickling one byte at
a time would defeat a read timeout alone).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
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


@dataclass
class _Pending:
    assoc: Association
    address: str
    opened: float


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
        """Admit a new connection as pending, displacing older pending ones at a bound."""
        set_read_timeout(assoc, self.settings.association_request_timeout_s + BACKSTOP_S)
        assoc.dul._run_loop_delay = PENDING_LOOP_DELAY_S
        displaced: list[tuple[_Pending, str]] = []
        refuse = False
        with self._lock:
            self._pending[assoc] = _Pending(assoc, address, time.monotonic())
            if len(self._pending) > self.settings.max_pending_connections:
                oldest = min(self._pending.values(), key=lambda p: p.opened)
                displaced.append((oldest, "pending_limit"))
                del self._pending[oldest.assoc]
            from_address = [p for p in self._pending.values() if p.address == address]
            established = sum(1 for a in self._established.values() if a == address)
            if len(from_address) + established > self.settings.max_connections_per_address:
                older = [p for p in from_address if p.assoc is not assoc]
                if older:
                    oldest = min(older, key=lambda p: p.opened)
                    displaced.append((oldest, "address_limit"))
                    del self._pending[oldest.assoc]
                else:
                    del self._pending[assoc]
                    refuse = True
            for pending, _ in displaced:
                self.closed_by_gate.add(pending.assoc)
            if refuse:
                self.closed_by_gate.add(assoc)
        for pending, reason in displaced:
            self.on_refused(reason)
            key = "node.max_pending_connections" if reason == "pending_limit" else (
                "node.max_connections_per_address")
            self.log.warning(f"{reason}:{pending.address}",
                             "closed pending connection from %s, open %.1f s without a complete "
                             "A-ASSOCIATE-RQ, to make room for a new one (%s)",
                             pending.address, time.monotonic() - pending.opened, key)
            close_socket(pending.assoc)
        if refuse:
            self.on_refused("address_limit")
            self.log.warning(f"address_limit:{address}",
                             "refused connection from %s: already %d connection(s) from that "
                             "address, all associated (node.max_connections_per_address)",
                             address, self.settings.max_connections_per_address)
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
