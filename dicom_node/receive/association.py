"""Association details the Storage SCP and the sender share: A-ASSOCIATE-RJ codes and TCP set-up."""

from __future__ import annotations

import socket

from pynetdicom.events import Event

#: A-ASSOCIATE-RJ Result (PS3.8 9.3.4): trying again will not help.
REJECTED_PERMANENT = 0x01
#: A-ASSOCIATE-RJ Result: the peer cannot take the association now (e.g. too many open).
REJECTED_TRANSIENT = 0x02
#: A-ASSOCIATE-RJ Source: the rejection comes from the service user (the application).
SOURCE_SERVICE_USER = 0x01
#: A-ASSOCIATE-RJ Reason/Diagnostic for source service-user: no reason given.
NO_REASON_GIVEN = 0x01


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
