"""pynetdicom's complaints about a peer: one WARNING per association naming the peer, no tracebacks."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

from pynetdicom.association import Association

__all__ = ["PeerErrorFilter"]


def _association_of_thread() -> Association | None:
    """Return the association whose thread (its own or its DUL reactor's) is running."""
    thread = threading.current_thread()
    if isinstance(thread, Association):
        return thread
    assoc = getattr(thread, "assoc", None)  # pynetdicom's DULServiceProvider
    return assoc if isinstance(assoc, Association) else None


class PeerErrorFilter(logging.Filter):
    """Turn pynetdicom's ERRORs and tracebacks about one association into one WARNING line.

    pynetdicom logs every undecodable PDU at ERROR, often with a traceback, and keeps doing so
    until the association ends: 64 KB of noise gave about 50 such lines. On the node those
    are a peer's mistakes, not the node's: the first one of each association is kept, at
    WARNING, with the peer's address and the exception's message; the rest are dropped, as
    are those about connections the node closed itself (already logged with the reason).

    Parameters
    ----------
    is_ours
        Whether an association belongs to the SCP this filter serves; records about other
        associations (another SCP in the process, the node's own sends) pass unchanged.
    already_explained
        Whether the node closed that association itself and said why.
    """

    def __init__(self, is_ours: Callable[[Association], bool],
                 already_explained: Callable[[Association], bool]) -> None:
        super().__init__()
        self.is_ours = is_ours
        self.already_explained = already_explained
        self._reported: weakref.WeakSet[Association] = weakref.WeakSet()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        assoc = _association_of_thread()
        if assoc is None or not self.is_ours(assoc):
            return True
        if self.already_explained(assoc):
            return False
        with self._lock:
            if assoc in self._reported:
                return False
            self._reported.add(assoc)
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{message}: {record.exc_info[1]!r}"
        record.msg = "association with %s: %s (pynetdicom; further messages about it suppressed)"
        record.args = (assoc.requestor.address, message)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True

    def install(self) -> None:
        """Attach to pynetdicom's loggers (a filter on a logger does not reach its children)."""
        for logger in _pynetdicom_loggers():
            logger.addFilter(self)

    def remove(self) -> None:
        """Detach from pynetdicom's loggers."""
        for logger in _pynetdicom_loggers():
            logger.removeFilter(self)


def _pynetdicom_loggers() -> list[logging.Logger]:
    names = [name for name in list(logging.root.manager.loggerDict)
             if name == "pynetdicom" or name.startswith("pynetdicom.")]
    return [logging.getLogger(name) for name in names]
