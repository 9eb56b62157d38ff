"""The Storage SCP: persist each instance durably, record it, then acknowledge; nothing more."""

from __future__ import annotations

import logging
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import status
from dicom_node.config import NodeSettings
from dicom_node.errors import RejectedInstance
from dicom_node.receive.association import (
    LOCAL_LIMIT_EXCEEDED,
    NO_REASON_GIVEN,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    SOURCE_SERVICE_USER,
    disable_nagle,
    send_reject,
    server_tls_context,
)
from dicom_node.receive.admission import BACKSTOP_S, AdmissionGate, calling_ae_title
from dicom_node.receive.ingest import identify, persist, raw_uid, series_attributes
from dicom_node.state.records import InstanceRecord
from dicom_node.state.ledger import Ledger
from dicom_node.receive.peer_errors import PeerErrorFilter
from dicom_node.receive.pynetdicom_internals import check_pynetdicom_internals
from dicom_node.receive.spool import Spool, is_valid_uid
from dicom_node.receive.structure import check_structure

__all__ = ["ReceiveCounters", "StorageSCP", "raw_uid", "series_attributes"]

logger = logging.getLogger(__name__)

#: Idle sleep of pynetdicom's DUL loop on our associations (pynetdicom's default: 1 ms).
DUL_LOOP_DELAY_S = 0.0001

#: Uncompressed transfer syntaxes, accepted last (see :func:`transfer_syntax_preference`).
_UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
)


def transfer_syntax_preference() -> list[str]:
    """Return every transfer syntax we accept, compressed ones first.

    pynetdicom accepts, per presentation context, the first syntax of *our* list that the
    peer proposed. A peer that proposes a JPEG 2000 file's own syntax next to Explicit VR
    Little Endian must get its own syntax accepted, so the instance is stored exactly as
    sent and the peer never has to decompress (DCMTK, for one, cannot decode JPEG 2000).
    """
    ordered = [uid for uid in ALL_TRANSFER_SYNTAXES if uid not in _UNCOMPRESSED]
    return ordered + [uid for uid in _UNCOMPRESSED if uid in ALL_TRANSFER_SYNTAXES]


class ReceiveCounters:
    """Thread-safe counts of instances stored and rejected, by reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stored = 0
        self.bytes = 0
        self.rejected: Counter[str] = Counter()
        #: Connections and associations refused or closed by the admission gate, by reason.
        self.refused_connections: Counter[str] = Counter()

    def add_stored(self, size_bytes: int) -> None:
        with self._lock:
            self.stored += 1
            self.bytes += size_bytes

    def add_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def add_refused_connection(self, reason: str) -> None:
        with self._lock:
            self.refused_connections[reason] += 1


#: Stands in for an unusable Affected SOP Instance UID of a C-STORE request until it is refused.
PLACEHOLDER_UID = "2.25.0"

#: CommandField of a C-STORE-RQ (PS3.7 E.1).
_C_STORE_RQ = 0x0001

#: (7FE0,0010) and the float/double pixel data after it: the header ends there.
_PIXEL_DATA_GROUP = 0x7FE0


def _before_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group >= _PIXEL_DATA_GROUP


def received_stream(event: Event) -> BytesIO:
    """Return the encoded data set of a C-STORE request, as pynetdicom received it."""
    request = cast(C_STORE, event.request)
    stream = request.DataSet
    if not isinstance(stream, BytesIO):
        raise RejectedInstance(status.CANNOT_UNDERSTAND, "the C-STORE request has no data set")
    return stream


def read_header(event: Event) -> Dataset:
    """Return the received data set's elements before the pixel data, without copying it.

    Decoding the whole instance (``event.dataset``) would read the pixel data into a new
    buffer only to find the UIDs; reading up to (7FE0,0010) costs the same for any image
    size. Deflated data sets must be inflated first, so they take pynetdicom's path.
    """
    syntax = event.context.transfer_syntax
    if syntax.is_deflated:
        return event.dataset
    stream = received_stream(event)
    stream.seek(0)
    try:
        return read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                            stop_when=_before_pixels)
    finally:
        stream.seek(0)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Return the Part 10 preamble, prefix and file meta information of a received instance.

    The same elements as pynetdicom's ``Event.file_meta`` (version, media storage SOP class
    and instance, transfer syntax, pynetdicom's implementation class UID and version name),
    encoded here directly: building and writing a pydicom data set for them took about 7 %
    of the node's CPU while receiving.
    """
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((b"\x00" * 128, b"DICM", length, elements))


def file_preamble_and_meta(event: Event) -> bytes:
    """Return the Part 10 preamble, prefix and file meta information of a received instance."""
    request = cast(C_STORE, event.request)
    return file_meta_bytes(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                           str(event.context.transfer_syntax))


def _share_transfer_syntax_uids(ae: AE) -> None:
    """Let every presentation context hold the same UID objects for the same syntax.

    pynetdicom deep-copies the acceptor's contexts for every association: about 170
    storage classes times 45 syntaxes, each UID rebuilt and re-validated, took 38 ms
    per association here. ``deepcopy`` copies an object once however often it is
    referenced, so with shared UIDs it copies 45 of them (3 ms). pynetdicom builds a
    new UID per context and has no public way to share them, hence the private list.
    """
    shared: dict[str, UID] = {}
    for context in ae.supported_contexts:
        syntaxes = context._transfer_syntax
        syntaxes[:] = [shared.setdefault(str(uid), uid) for uid in syntaxes]


def error_comment(reason: str) -> str:
    """Return ``reason`` as an ErrorComment value: LO, 64 characters, no backslash or control code."""
    text = "".join(c if c.isprintable() and c != "\\" else " " for c in reason)
    return text[:64]


def _failure(code: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = error_comment(comment)
    return rsp


class StorageSCP:
    """Receives instances over DICOM and stores them in the spool and the ledger.

    Parameters
    ----------
    settings
        The ``[node]`` section of the configuration.
    spool, ledger
        Where files and state go.
    clock
        Returns the current time in seconds; injected so tests control it.
    on_stored
        Called (in the association's thread) after an instance is recorded; used to wake
        the grouper. Must be quick.
    """

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        ledger: Ledger,
        *,
        clock: Callable[[], float] = time.time,
        on_stored: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self.clock = clock
        self.on_stored = on_stored
        self.counters = ReceiveCounters()
        self._server: ThreadedAssociationServer | None = None
        self._allowed_addresses = frozenset(settings.allowed_addresses)
        #: Per association: message ID -> why its request's identifiers are unusable.
        self._bad_identifiers: weakref.WeakKeyDictionary[Association, dict[int, str]] = (
            weakref.WeakKeyDictionary())
        self._bad_identifiers_lock = threading.Lock()
        self.gate = AdmissionGate(settings, self.counters.add_refused_connection)
        self._peer_errors = PeerErrorFilter(self._is_ours, self.gate.closed_by_gate.__contains__)
        self._ae: AE | None = None
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    def build_ae(self) -> AE:
        """Return the application entity with every storage SOP class and transfer syntax."""
        # pynetdicom's standard notification handlers format every PDU and DIMSE message
        # for DEBUG logging, converting each command element on the way (and so warning about
        # malformed ones before the node can refuse them): leave them unbound (_config docs).
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.settings.ae_title)
        # The gate bounds pending connections and association slots (admission.py); pynetdicom
        # counts every connection, pending or closing, so its own limit only backs ours up.
        ae.maximum_associations = min(
            2 * self.settings.max_associations + self.settings.max_pending_connections, 1024)
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.network_timeout = self.settings.network_timeout_s
        # How long the association thread waits for the request once the connection is open
        # (pynetdicom's default is 30 s); see _close_stalled_requests for the socket side.
        ae.acse_timeout = self.settings.association_request_timeout_s + BACKSTOP_S
        ae.require_called_aet = self.settings.require_called_ae_title
        if self.settings.allowed_calling_ae_titles:
            ae.require_calling_aet = list(self.settings.allowed_calling_ae_titles)
        syntaxes = transfer_syntax_preference()
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        _share_transfer_syntax_uids(ae)
        return ae

    def start(self) -> tuple[str, int]:
        """Start listening in background threads; return the bound (host, port).

        Raises
        ------
        RuntimeError
            The installed pynetdicom lacks an internal the SCP relies on.
        """
        check_pynetdicom_internals()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_DIMSE_RECV, self.handle_dimse_recv),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_association_ended),
            (evt.EVT_CONN_CLOSE, self.handle_association_ended),
        ]
        ae = self.build_ae()
        self._ae = ae
        self._peer_errors.install()
        tls = self.settings.tls
        server = ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers,
            ssl_context=server_tls_context(tls) if tls is not None else None,
        )
        if server is None:
            raise RuntimeError("pynetdicom did not return a server")
        # socketserver listens with a backlog of 5: a burst of connections beyond it (20 senders
        # at once, or silent peers) waits out a 1 s SYN retransmission each; listen() again
        # raises it (Linux updates the backlog of a listening socket).
        if server.socket is not None:
            server.socket.listen(self.settings.max_pending_connections)
        self._server = server
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._close_stalled_requests,
                                          name="association-request-watchdog", daemon=True)
        self._watchdog.start()
        host, port = server.server_address[:2]
        logger.info("Storage SCP %s listening on %s:%d%s", self.settings.ae_title, host, port,
                    " (DICOM TLS)" if tls is not None else "")
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting associations and wait for the open ones to end."""
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            logger.info("Storage SCP stopped")
        self._peer_errors.remove()

    # -- event handlers (pynetdicom threads) -------------------------------------------

    def _is_ours(self, assoc: Association) -> bool:
        return self._ae is not None and assoc.ae is self._ae and assoc.is_acceptor

    def handle_conn_open(self, event: Event) -> None:
        """Admit a new connection as pending (see :class:`AdmissionGate`); Nagle's algorithm off.

        Without TCP_NODELAY every instance waits ~40 ms for the peer's delayed ACK.
        """
        disable_nagle(event)
        self.gate.open(event.assoc, event.assoc.requestor.address)

    def handle_accepted(self, event: Event) -> None:
        """Shorten the DUL loop's idle sleep once the association is established.

        pynetdicom's DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever it finds no event,
        which adds up to about a millisecond per PDU gap and per response; 0.1 ms costs a few
        percent of a core per open association and raises single-association throughput.
        Only established associations get it: a connection that never sends a complete
        request would otherwise spin its thread 10,000 times a second for nothing.
        """
        event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S

    def handle_association_ended(self, event: Event) -> None:
        """Free a connection's slot (rejected or closed)."""
        self.gate.closed(event.assoc)

    def _close_stalled_requests(self) -> None:
        """Every half timeout, close connections without a complete A-ASSOCIATE-RQ (the gate)."""
        limit_s = self.settings.association_request_timeout_s
        while not self._stopping.wait(min(1.0, limit_s / 2)):
            self.gate.close_stalled()

    def handle_requested(self, event: Event) -> None:
        """Reject associations from addresses outside the allow-list, or with no slot free.

        At ``node.max_associations`` the request waits up to ``node.association_wait_s`` for a
        slot, then is rejected transient, local limit exceeded (PS3.8 9.3.4), so the sender
        may try again; the gate logs and counts it.
        """
        address = event.assoc.requestor.address
        if self._allowed_addresses and address not in self._allowed_addresses:
            self.gate.closed(event.assoc)
            logger.warning(
                "rejected association from %s (AE %s): address not in node.allowed_addresses",
                address, calling_ae_title(event.assoc),
            )
            send_reject(event.assoc, REJECTED_PERMANENT, SOURCE_SERVICE_USER, NO_REASON_GIVEN)
            return
        if not self.gate.request_complete(event.assoc):
            send_reject(event.assoc, REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION,
                        LOCAL_LIMIT_EXCEEDED)
            return
        event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S  # the A-ASSOCIATE-AC leaves at once

    def handle_dimse_recv(self, event: Event) -> None:
        """Make a C-STORE request with unusable identifiers one the node can answer.

        pynetdicom drops a request whose Affected SOP Instance or Class UID is empty (the
        sender waits for a response that never comes), aborts the association, with a
        traceback, when one is longer than 64 characters, and pydicom warns about other
        malformed ones. Such an identifier is replaced here by a placeholder before
        pynetdicom converts the message, and the request is refused
        with ``INVALID_IDENTIFIERS`` and the reason (PS3.7 9.1.1.1.9: the response's Affected
        SOP Instance UID is optional, so echoing the placeholder misleads no one).
        """
        command = event.message.command_set
        if command.get("CommandField") != _C_STORE_RQ:
            return
        problems = []
        for keyword in ("AffectedSOPInstanceUID", "AffectedSOPClassUID"):
            uid = raw_uid(command, keyword)
            if is_valid_uid(uid):
                continue
            if not uid:
                problems.append(f"{keyword} is empty")
            elif len(uid) > 64:
                problems.append(f"{keyword} is {len(uid)} characters long")
            else:
                problems.append(f"{keyword} is invalid ({error_comment(uid[:24])!r})")
            placeholder = PLACEHOLDER_UID
            if keyword == "AffectedSOPClassUID":  # the negotiated class, so the request is routed
                placeholder = next((str(c.abstract_syntax) for c in event.assoc.accepted_contexts
                                    if c.context_id == event.message.context_id), PLACEHOLDER_UID)
            # item assignment, not setattr: setattr would convert (and warn about) the old value
            command[Tag(keyword)] = DataElement(Tag(keyword), "UI", UID(placeholder))
        if problems:
            with self._bad_identifiers_lock:
                per_assoc = self._bad_identifiers.setdefault(event.assoc, {})
                per_assoc[int(command.get("MessageID", 0))] = "; ".join(problems)

    def _request_problem(self, event: Event) -> str | None:
        """Return why this request's identifiers were unusable (see :meth:`handle_dimse_recv`)."""
        with self._bad_identifiers_lock:
            per_assoc = self._bad_identifiers.get(event.assoc)
            if not per_assoc:
                return None
            return per_assoc.pop(int(cast(C_STORE, event.request).MessageID or 0), None)

    def handle_echo(self, event: Event) -> int:
        """Answer C-ECHO."""
        return status.SUCCESS

    def handle_store(self, event: Event) -> int | Dataset:
        """Store one instance durably and record it before answering success."""
        calling = event.assoc.requestor.ae_title
        try:
            record, series = self._store(event, calling)
        except RejectedInstance as exc:
            self.counters.add_rejected(status.describe(exc.status))
            logger.warning(
                "refused instance %s from %s: %s (%s)",
                cast(C_STORE, event.request).AffectedSOPInstanceUID, calling, exc.reason,
                status.describe(exc.status),
            )
            return _failure(exc.status, exc.reason)
        self.counters.add_stored(record.size_bytes)
        if self.on_stored is not None:
            self.on_stored(record.study_uid)
        return status.SUCCESS

    def _store(self, event: Event, calling: str) -> tuple[InstanceRecord, dict[str, Any]]:
        problem = self._request_problem(event)
        if problem is not None:
            raise RejectedInstance(status.INVALID_IDENTIFIERS, f"C-STORE request: {problem}")
        # Reading the header alone would acknowledge a data set cut short in its pixel data,
        # or encoded in another syntax than the context's: walk it all first (no pixel decoding).
        with received_stream(event).getbuffer() as data:
            check_structure(data, event.context.transfer_syntax,
                            cast(C_STORE, event.request).AffectedSOPClassUID)
        try:
            ds = read_header(event)
        except Exception as exc:  # pydicom raises many types for corrupt data
            raise RejectedInstance(
                status.CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}"
            ) from exc
        ids = identify(ds)
        request = cast(C_STORE, event.request)
        if (ids.sop_instance_uid != request.AffectedSOPInstanceUID
                or ids.sop_class_uid != request.AffectedSOPClassUID):
            raise RejectedInstance(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class/Instance UID in the data set differ from the C-STORE request",
            )
        with received_stream(event).getbuffer() as data:  # no copy of the pixel data
            record = persist(
                ids, (file_preamble_and_meta(event), data),
                transfer_syntax_uid=str(event.context.transfer_syntax), spool=self.spool,
                ledger=self.ledger, min_free_disk_bytes=self.settings.min_free_disk_bytes,
                calling_ae_title=calling, received_at=self.clock(),
            )
        return record, ids.series
