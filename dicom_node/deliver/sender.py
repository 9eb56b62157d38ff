"""C-STORE of result files to a destination: one association per job and destination, every status checked."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association

from dicom_node import status
from dicom_node.config import Destination
from dicom_node.errors import DeliveryFailed
from dicom_node.receive.association import (
    REJECTED_PERMANENT,
    client_tls_context,
    disable_nagle,
    peer_names,
)
from dicom_node.receive.pynetdicom_internals import check_pynetdicom_internals

logger = logging.getLogger(__name__)


def associate(ae: AE, destination: Destination) -> Association:
    """Request an association with ``destination``, over DICOM TLS when it says ``tls = true``.

    Raises
    ------
    DeliveryFailed
        ``retryable=False`` when the peer's certificate carries none of ``allowed_peer_names``
        (naming those it carries and those allowed); ``retryable=True`` with the reason when
        the TLS handshake failed (e.g. a certificate not signed by ``ca_certificates``).
    RuntimeError
        The installed pynetdicom lacks an internal the node relies on.
    """
    check_pynetdicom_internals()
    if not destination.tls:
        return ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                            evt_handlers=[(evt.EVT_CONN_OPEN, disable_nagle)])
    context = client_tls_context(destination)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, disable_nagle)],
                         tls_args=(context, destination.host))
    error = context.handshake_error
    if error is not None:
        transport = assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.close()  # pynetdicom leaves a failed TLS socket open
        detail = getattr(error, "verify_message", None)
        raise DeliveryFailed(f"TLS handshake with {where} failed: {error.reason or error}"
                             + (f" ({detail}; checked against ca_certificates)" if detail else ""),
                             retryable=True)
    if assoc.is_established and destination.allowed_peer_names:
        transport = assoc.dul.socket
        sock = transport.socket if transport is not None else None
        certificate = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        names = peer_names(dict(certificate or {}))
        if not names & set(destination.allowed_peer_names):
            assoc.abort()
            raise DeliveryFailed(
                f"{where} presented a certificate for {', '.join(sorted(names)) or 'no name'}, "
                f"none of allowed_peer_names ({', '.join(destination.allowed_peer_names)}): "
                "nothing sent", retryable=False)
    return assoc


class _ResponsesForTheCaller:
    """Give back to a waiting request the response pynetdicom's association reactor took.

    Before each request, pynetdicom pauses the association's reactor thread by clearing a
    checkpoint and waiting for the reactor's paused flag; a reactor that has just passed the
    checkpoint still shows that flag, goes on to look for a message, and can take the peer's
    response. pynetdicom then logs "Received unexpected C-STORE service message" and drops it,
    and the request waits out its DIMSE timeout (pydicom/pynetdicom#875; seen twice in about
    5,000 results sent by the scale-out benchmark). While a request runs in :meth:`awaiting`,
    a response the reactor takes goes back on the queue the request reads.
    """

    def __init__(self, assoc: Association) -> None:
        self._waiting = threading.Event()
        self._assoc = assoc
        self._serve = assoc._serve_request
        assoc._serve_request = self._serve_or_hand_back  # type: ignore[method-assign]

    @contextmanager
    def awaiting(self) -> Iterator[None]:
        """Mark the block as a request of ours waiting for its response."""
        self._waiting.set()
        try:
            yield
        finally:
            self._waiting.clear()

    def _serve_or_hand_back(self, msg: Any, context_id: int) -> None:
        if self._waiting.is_set() and not msg.is_valid_request:
            self._assoc.dimse.msg_queue.put((context_id, msg))
            return
        self._serve(msg, context_id)


def send_files(
    files: Sequence[Path | str],
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout_s: float = 60.0,
) -> list[str]:
    """Send DICOM files to ``destination`` over one association.

    Returns
    -------
    list[str]
        The SOP Instance UIDs the peer stored (success or warning status).

    Raises
    ------
    DeliveryFailed
        ``retryable=True`` when the peer could not be reached, aborted or timed out,
        rejected the association as transient (e.g. too many open) or answered a failure
        that may be transient; ``retryable=False`` when a file is missing or unreadable,
        or the peer rejected the association permanently (e.g. an unknown AE title).
    """
    headers: list[tuple[Path, Dataset]] = []
    for path in files:
        try:
            headers.append((Path(path), pydicom.dcmread(path, stop_before_pixels=True)))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise DeliveryFailed(f"file {path} is unreadable: {exc}", retryable=False) from exc
    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    # Each file as it is stored (its own transfer syntax alone), and per SOP class the two
    # uncompressed syntaxes a file can be converted to when the peer takes neither.
    stored_as = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in headers}
    sop_classes = {sop_class for sop_class, _ in stored_as}
    if len(stored_as) + len(sop_classes) > 128:
        raise DeliveryFailed("more than 128 presentation contexts needed", retryable=False)
    for sop_class, syntax in sorted(stored_as):
        ae.add_requested_context(sop_class, syntax)
    for sop_class in sorted(sop_classes):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = associate(ae, destination)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
        if answer is None:
            raise DeliveryFailed(f"{where} rejected the association", retryable=True)
        raise DeliveryFailed(
            f"{where} rejected the association ({answer.result_str}, {answer.source_str}: "
            f"{answer.reason_str})",
            retryable=answer.result != REJECTED_PERMANENT,
        )
    if not assoc.is_established:
        raise DeliveryFailed(f"cannot connect to {where}", retryable=True)
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    # A file the peer takes in its own transfer syntax goes as it is on disk, in chunks, without
    # being decoded and encoded again (most of the sender's CPU for a multi-megabyte result);
    # any other is decoded and converted by pynetdicom.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    responses = _ResponsesForTheCaller(assoc)
    stored = []
    try:
        for path, ds in headers:
            as_stored = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) in accepted
            request = path if as_stored else pydicom.dcmread(path)
            with responses.awaiting():
                rsp = assoc.send_c_store(request)
            code = getattr(rsp, "Status", None)
            if code is None:
                raise DeliveryFailed(
                    f"{where} gave no C-STORE response for {ds.SOPInstanceUID} (timeout or abort)",
                    retryable=True,
                )
            if not status.is_stored(int(code)):
                comment = rsp.get("ErrorComment", "")
                raise DeliveryFailed(
                    f"{where} refused {ds.SOPInstanceUID}: {status.describe(int(code))} {comment}".strip(),
                    retryable=True,
                )
            stored.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def echo(destination: Destination, *, calling_ae_title: str, timeout_s: float = 10.0) -> int:
    """C-ECHO a peer; return the status, or raise :class:`DeliveryFailed` when unreachable."""
    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = associate(ae, destination)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if not assoc.is_established:
        raise DeliveryFailed(f"cannot associate with {where}", retryable=True)
    try:
        with _ResponsesForTheCaller(assoc).awaiting():
            rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(rsp, "Status", None)
    if code is None:
        raise DeliveryFailed(f"{where} did not answer the C-ECHO", retryable=True)
    return int(code)


