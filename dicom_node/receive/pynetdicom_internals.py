"""The pynetdicom internals the node relies on, checked at start-up so an upgrade that drops one fails loudly."""

from __future__ import annotations

from functools import cache

import pynetdicom
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

__all__ = ["check_pynetdicom_internals"]


@cache
def _problems() -> tuple[str, ...]:
    """Return one line per internal that is missing or changed shape (checked once per process)."""
    problems: list[str] = []
    if not isinstance(getattr(pynetdicom_config, "LOG_HANDLER_LEVEL", None), str):
        problems.append("pynetdicom._config.LOG_HANDLER_LEVEL is gone")
    if not isinstance(getattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", None), bool):
        problems.append("pynetdicom._config.STORE_SEND_CHUNKED_DATASET (sending files as stored) is gone")
    try:
        assoc = Association(AE(), "requestor")  # never started: no socket, no thread
    except (AttributeError, TypeError) as exc:
        return (*problems, f"an Association cannot be built to look inside: {exc}")
    dul = assoc.dul
    # Assigning a renamed attribute would silently create a new one: check that it exists.
    if not isinstance(getattr(dul, "_run_loop_delay", None), float):
        problems.append("DULServiceProvider._run_loop_delay (the DUL loop's idle sleep) is gone")
    if getattr(getattr(dul, "state_machine", None), "current_state", None) != "Sta1":
        problems.append("DULServiceProvider.state_machine.current_state (PS3.8 state) is gone")
    if getattr(dul, "assoc", None) is not assoc:
        problems.append("DULServiceProvider.assoc (the DUL thread's association) is gone")
    if not hasattr(dul, "socket"):
        problems.append("DULServiceProvider.socket (the association's transport) is gone")
    if not callable(getattr(assoc, "_serve_request", None)):
        problems.append("Association._serve_request (where the reactor hands a message it took) is gone")
    if not callable(getattr(getattr(assoc.dimse, "msg_queue", None), "put", None)):
        problems.append("DIMSEServiceProvider.msg_queue (the queue a request's response is read from) is gone")
    if not callable(getattr(assoc.acse, "send_reject", None)):
        problems.append("ACSE.send_reject is gone")
    if not hasattr(assoc.requestor, "primitive"):
        problems.append("ServiceUser.primitive (the received A-ASSOCIATE-RQ) is gone")
    if not isinstance(getattr(PresentationContext(), "_transfer_syntax", None), list):
        problems.append("PresentationContext._transfer_syntax (shared transfer syntax UIDs) is gone")
    return tuple(problems)


def check_pynetdicom_internals() -> None:
    """Check every pynetdicom internal the Storage SCP and the sender use.

    Setting a private attribute that an upgrade renamed would raise nothing and silently undo
    what it was for (the idle CPU of pending connections, the A-ASSOCIATE-RJ race, a response
    the reactor took), so the node refuses to start instead.

    Raises
    ------
    RuntimeError
        Naming each internal that is missing and the installed pynetdicom version.
    """
    problems = _problems()
    if problems:
        raise RuntimeError(
            f"pynetdicom {pynetdicom.__version__} lacks what dicom-node relies on (tested with 3.0): "
            + "; ".join(problems))
