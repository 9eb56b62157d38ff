"""Association details the Storage SCP and the sender share: A-ASSOCIATE-RJ codes, TCP and TLS set-up."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from pynetdicom.association import Association
from pynetdicom.events import Event

from dicom_node.config import Destination, TlsSettings

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


class _LazyHandshakeContext(ssl.SSLContext):
    """An SSL context whose server sockets shake hands on first read, not in ``accept``.

    pynetdicom wraps each accepted socket in the thread that accepts connections; with the
    default handshake-on-connect, one peer that opens a TLS port and says nothing would stop
    every other connection from being accepted. Deferred, the handshake runs in the
    connection's own thread, under its read timeout.
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if kwargs.get("server_side"):
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """Return the TLS context of the Storage SCP (and the HTTP API): TLS 1.2 or later.

    Raises
    ------
    ssl.SSLError, OSError
        A file is unreadable, or the key does not match the certificate.
    """
    context = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("node.tls needs certificate and private_key to serve")
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else (
        ssl.CERT_OPTIONAL if tls.ca_certificates is not None else ssl.CERT_NONE)
    return context


class _HandshakeRecordingSocket(ssl.SSLSocket):
    """A client TLS socket that leaves the reason of a failed handshake on its context."""

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except ssl.SSLError as exc:
            if isinstance(self.context, ClientTlsContext):
                self.context.handshake_error = exc
            raise


class ClientTlsContext(ssl.SSLContext):
    """The TLS context of one association we request; says why its handshake failed.

    pynetdicom logs a failed handshake and reports only that the association was not
    established; ``handshake_error`` keeps the reason (e.g. the peer's certificate is not
    signed by ``ca_certificates``) for the caller's message.
    """

    sslsocket_class = _HandshakeRecordingSocket
    handshake_error: ssl.SSLError | None = None


def client_tls_context(destination: Destination) -> ClientTlsContext:
    """Return the TLS context for sending to ``destination``: TLS 1.2 or later, the peer's
    certificate checked against ``ca_certificates`` and, unless ``allowed_peer_names`` is set
    (then checked after the handshake, :func:`check_peer_name`), against the host name."""
    context = ClientTlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.ca_certificates is not None:
        context.load_verify_locations(destination.ca_certificates)
    if destination.certificate is not None and destination.private_key is not None:
        context.load_cert_chain(destination.certificate, destination.private_key)
    context.check_hostname = not destination.allowed_peer_names
    return context


def peer_names(certificate: dict[str, Any]) -> set[str]:
    """Return the DNS names and IP addresses of a certificate (``getpeercert()``), and its CN."""
    names = {str(value) for kind, value in certificate.get("subjectAltName", ())
             if kind in ("DNS", "IP Address")}
    for rdn in certificate.get("subject", ()):
        names.update(str(value) for key, value in rdn if key == "commonName")
    return names
