"""The node's errors, sorted by what the caller does next."""

from __future__ import annotations


class DicomNodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration is invalid: refuse to start. The message names the key."""


class LedgerUnavailable(DicomNodeError):
    """The ledger's database cannot be reached just now (a PostgreSQL restart): try again shortly."""


class ReceiverUnavailable(DicomNodeError):
    """A worker cannot reach the receiving node's API just now: the job goes back to the queue."""


class ReceiverUntrusted(ReceiverUnavailable):
    """A receiving node's HTTPS certificate is not signed by a CA the worker trusts (``node.tls``)."""


class RejectedInstance(DicomNodeError):
    """An instance cannot be stored: answer the C-STORE with ``status``.

    Parameters
    ----------
    status
        The DIMSE failure status to answer with (one of :mod:`dicom_node.status`).
    reason
        A specific, human-readable reason; it is logged and sent as ErrorComment.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class StudyNotProcessable(DicomNodeError):
    """A job cannot run on its input: it fails with this reason and nothing is sent."""


class InferenceFailed(DicomNodeError):
    """The analysis itself failed (a bug, a crash, a timeout): the job fails."""


class DeliveryFailed(DicomNodeError):
    """Results could not be sent. ``retryable`` says whether trying again may help."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


class InvalidJobRequest(DicomNodeError):
    """A job request that cannot be accepted; ``field`` names the part of the request at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class SourceUnavailable(DicomNodeError):
    """A configured source (Orthanc) did not answer, or not usefully: fall back and say why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"source {source}: {reason}")
        self.source = source
        self.reason = reason
