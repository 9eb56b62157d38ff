"""Association details the Storage SCP and the sender share: A-ASSOCIATE-RJ codes and TCP set-up."""

from __future__ import annotations

import socket
import time

from pynetdicom.association import Association
from pynetdicom.events import Event

#: A-ASSOCIATE-RJ Result (PS3.8 9.3.4): trying again will not help.
REJECTED_PERMANENT = 0x01
#: A-ASSOCIATE-RJ Result: the peer cannot take the association now (e.g. too many open).
REJECTED_TRANSIENT = 0x02
#: A-ASSOCIATE-RJ Source: the rejection comes from the service user (the application).
SOURCE_SERVICE_USER = 0x01
#: A-ASSOCIATE-RJ Reason/Diagnostic for source service-user: no reason given.
NO_REASON_GIVEN = 0x01
#: A-ASSOCIATE-RJ Source: the service provider, presentation related function.
SOURCE_PROVIDER_PRESENTATION = 0x03
#: A-ASSOCIATE-RJ Reason/Diagnostic for that source: local limit exceeded.
LOCAL_LIMIT_EXCEEDED = 0x02


def disable_nagle(event: Event) -> None:
    """Send every PDU at once: turn Nagle's algorithm off on a new association's socket.

    Bound to ``evt.EVT_CONN_OPEN``. With Nagle's algorithm on, every instance waits about
    40 ms for the peer's delayed ACK before its last PDU leaves.

    Parameters
    ----------
    event
        The ``EVT_CONN_OPEN`` event of the association.
    """
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_reject(assoc: Association, result: int, source: int, diagnostic: int,
                *, timeout_s: float = 2.0) -> None:
    """Reject an association from an ``EVT_REQUESTED`` handler and wait until the RJ is sent.

    pynetdicom shuts the socket down as soon as the handler returns; its DUL thread sends the
    A-ASSOCIATE-RJ on its next loop, often too late, and the peer sees a bare close ("peer
    aborted") instead of the reason. Waiting for the state machine's Sta13 (awaiting transport
    close, entered after AE-8 sent the RJ, PS3.8 9.2) closes that race.
    """
    assoc.dul._run_loop_delay = 0.0001
    assoc.acse.send_reject(result, source, diagnostic)
    deadline = time.monotonic() + timeout_s
    while assoc.dul.state_machine.current_state != "Sta13" and time.monotonic() < deadline:
        time.sleep(0.001)
