"""The delivery loop: send due results to their destinations, retry with backoff, then dead-letter."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from dicom_node.config import DeliverySettings, Destination
from dicom_node.deliver.rest import SOURCE_PREFIX, store_files
from dicom_node.deliver.sender import send_files
from dicom_node.errors import DeliveryFailed, LedgerUnavailable
from dicom_node.receive.source import OrthancSource
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import DueDelivery

logger = logging.getLogger(__name__)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Return the wait before the next attempt after ``attempts`` failures (exponential, capped)."""
    return float(min(max_s, initial_s * 2 ** max(0, attempts - 1)))


class DeliveryLoop:
    """Sends every due delivery in a thread of its own; whoever starts it stops it.

    A failure that may pass (a refused or dropped association) is retried after
    :func:`backoff_s`; after ``max_attempts``, or at once when retrying cannot help, the
    delivery is dead-lettered until someone re-queues it (``dicom-node retry``).

    Parameters
    ----------
    ledger
        Holds the deliveries and records every attempt.
    destinations
        The configured destinations by name.
    settings
        Retry policy and association timeout.
    calling_ae_title
        The node's AE title.
    job_line
        Returns the canonical log line of a job with an outcome.
    clock
        Wall-clock time source (injected in tests).
    on_sent
        Told the duration of every successful delivery (metrics).
    sources
        The Orthanc sources by name: a destination ``source:NAME`` is stored into that
        Orthanc through its REST API, with the same retries and dead-letter.
    local_files_only
        Several receiving nodes share the ledger and workers upload each job's results to
        one of them: send only the deliveries whose files are on this host, leaving the
        others to the node that holds them.
    """

    def __init__(
        self,
        ledger: Ledger,
        destinations: Mapping[str, Destination],
        settings: DeliverySettings,
        calling_ae_title: str,
        *,
        job_line: Callable[[str, str], str],
        clock: Callable[[], float],
        on_sent: Callable[[float], None],
        sources: Mapping[str, OrthancSource] | None = None,
        local_files_only: bool = False,
    ) -> None:
        self.ledger = ledger
        self.destinations = dict(destinations)
        self.settings = settings
        self.calling_ae_title = calling_ae_title
        self.job_line = job_line
        self.clock = clock
        self.on_sent = on_sent
        self.sources = dict(sources or {})
        self.local_files_only = local_files_only
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start sending in a background thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop after the delivery in progress, waiting at most ``timeout_s``."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.deliver_due()
            except LedgerUnavailable as exc:  # a database restart: results wait, nothing is lost
                logger.warning("delivery paused: %s", exc)
                self._stopping.wait(1.0)
            self._stopping.wait(0.1)

    def deliver_due(self) -> int:
        """Attempt every delivery that is due; return how many were sent."""
        sent = 0
        for delivery in self.ledger.due_deliveries(self.clock()):
            if self.local_files_only and not all(Path(f).is_file() for f in delivery.files):
                continue  # uploaded to another receiving node, which sends them
            # Several receivers may share the ledger: only the one that takes it sends it.
            if not self.ledger.claim_delivery(delivery.id, self.clock(), self._lease_s()):
                continue
            start = time.perf_counter()
            try:
                self._send(delivery)
            except DeliveryFailed as exc:
                self._failed(delivery, exc)
                continue
            self.ledger.delivery_succeeded(delivery.id, self.clock())
            self.ledger.add_timing(delivery.job_uid, "send", time.perf_counter() - start)
            self.on_sent(time.perf_counter() - start)
            logger.info(self.job_line(delivery.job_uid, f"sent to {delivery.destination}"))
            sent += 1
        return sent

    def _lease_s(self) -> float:
        """How long a claimed delivery is ours: its association, with room to spare."""
        return 4 * self.settings.timeout_s + 30.0

    def _send(self, delivery: DueDelivery) -> None:
        if delivery.destination.startswith(SOURCE_PREFIX):
            source = self.sources.get(delivery.destination.removeprefix(SOURCE_PREFIX))
            if source is None:
                raise DeliveryFailed(
                    f"destination {delivery.destination!r} names no configured source", retryable=False,
                )
            store_files(delivery.files, source)
            return
        destination = self.destinations.get(delivery.destination)
        if destination is None:
            raise DeliveryFailed(
                f"destination {delivery.destination!r} is no longer configured", retryable=False,
            )
        send_files(
            [Path(f) for f in delivery.files], destination,
            calling_ae_title=self.calling_ae_title, timeout_s=self.settings.timeout_s,
        )

    def _failed(self, delivery: DueDelivery, exc: DeliveryFailed) -> None:
        attempts = delivery.attempts + 1
        retry = exc.retryable and attempts < self.settings.max_attempts
        retry_at = (
            self.clock() + backoff_s(attempts, self.settings.retry_initial_s, self.settings.retry_max_s)
            if retry else None
        )
        self.ledger.delivery_failed(delivery.id, self.clock(), str(exc), retry_at=retry_at)
        if retry_at is not None:
            logger.warning(
                "delivery of job %s to %s failed (attempt %d), retry in %.0f s: %s",
                delivery.job_uid, delivery.destination, attempts, retry_at - self.clock(), exc,
            )
        else:
            logger.error(
                "%s reason=%r", self.job_line(delivery.job_uid, f"dead-letter ({delivery.destination})"),
                str(exc),
            )
