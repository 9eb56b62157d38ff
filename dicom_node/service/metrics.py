"""Prometheus metrics of one node: stage latencies, queue depths, instances received, job outcomes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.receive.scp import ReceiveCounters
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import STAGES, DeliveryState, JobRecord, JobState, Origin, StudyRecord, StudyState

logger = logging.getLogger(__name__)

#: Seconds: from a fast C-STORE of one instance to a slow model on a large study.
BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _LedgerCollector(Collector):
    """Queue depths and ingress counts read at scrape time, so they survive restarts."""

    def __init__(self, ledger: Ledger, receive_counters: Callable[[], Mapping[Origin, ReceiveCounters]]) -> None:
        self.ledger = ledger
        self.receive_counters = receive_counters

    def collect(self) -> Iterator[Metric]:
        counts = self.ledger.counts()
        jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs in the ledger by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state], counts.jobs.get(state, 0))
        yield jobs
        deliveries = GaugeMetricFamily("dicom_node_deliveries", "Deliveries by state", labels=["state"])
        for delivery_state in DeliveryState:
            deliveries.add_metric([delivery_state], counts.deliveries.get(delivery_state, 0))
        yield deliveries
        depth = GaugeMetricFamily("dicom_node_queue_depth", "Work waiting, by queue", labels=["queue"])
        depth.add_metric(["jobs"], counts.jobs.get(JobState.QUEUED, 0))
        depth.add_metric(["deliveries"], counts.deliveries.get(DeliveryState.PENDING, 0))
        depth.add_metric(["studies_receiving"], counts.studies.get(StudyState.RECEIVING, 0))
        yield depth
        yield from _fleet_metrics(self.ledger)
        yield GaugeMetricFamily("dicom_node_results_low_confidence",
                                "Finished jobs whose analysis flagged its result as low confidence",
                                value=counts.low_confidence)
        received = CounterMetricFamily(
            "dicom_node_instances_received", "Instances stored since start, by way in", labels=["origin"]
        )
        rejected = CounterMetricFamily(
            "dicom_node_instances_rejected", "Instances refused since start, by way in and reason",
            labels=["origin", "reason"],
        )
        refused = CounterMetricFamily(
            "dicom_node_connections_refused",
            "DICOM connections and associations refused or closed by the node since start, by reason "
            "(association_limit, address_limit, pending_limit, request_timeout)", labels=["reason"],
        )
        for origin, counters in self.receive_counters().items():
            received.add_metric([origin], counters.stored)
            for reason, count in dict(counters.rejected).items():
                rejected.add_metric([origin, reason], count)
            for reason, count in dict(counters.refused_connections).items():
                refused.add_metric([reason], count)
        yield received
        yield rejected
        yield refused


def _fleet_metrics(ledger: Ledger) -> Iterator[Metric]:
    """The job queue of the scaled-out mode: jobs per queue and status, workers and heartbeats."""
    depths = getattr(ledger, "queue_depths", None)
    workers = getattr(ledger, "workers", None)
    if depths is None or workers is None:
        return
    queued = GaugeMetricFamily("dicom_node_queue_jobs", "Jobs in the job queue, by queue and status",
                               labels=["queue", "status"])
    for name, depth in sorted(depths().items()):
        for status, count in sorted(depth.items()):
            queued.add_metric([name, status], count)
    yield queued
    registered = workers()
    yield GaugeMetricFamily("dicom_node_workers", "Registered queue workers", value=len(registered))
    age = GaugeMetricFamily("dicom_node_worker_heartbeat_age_seconds",
                            "Seconds since each worker's last heartbeat", labels=["worker"])
    for worker in registered:
        age.add_metric([str(worker["id"])], worker["heartbeat_age_s"])
    yield age


class NodeMetrics:
    """The node's metrics in a registry of its own (no process-global state).

    Parameters
    ----------
    ledger
        Read at scrape time for queue depths and job states.
    receive_counters
        Returns ``{origin: ReceiveCounters}`` for every way instances come in.
    """

    def __init__(self, ledger: Ledger, receive_counters: Callable[[], Mapping[Origin, ReceiveCounters]]) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "dicom_node_stage_seconds", "Duration of each stage of a job", ["stage"],
            buckets=BUCKETS_S, registry=self.registry,
        )
        self.jobs_finished = Counter(
            "dicom_node_jobs_finished", "Jobs finished since start, by analysis and outcome",
            ["analysis", "outcome"], registry=self.registry,
        )
        self.registry.register(_LedgerCollector(ledger, receive_counters))

    def observe_job(self, job: JobRecord, study: StudyRecord | None, outcome: str) -> None:
        """Record a finished job's stage timings (as in its log line) and outcome."""
        for stage, seconds in job.stage_timings(study).items():
            if stage in STAGES and stage != "send" and seconds >= 0:
                self.stage_seconds.labels(stage).observe(seconds)
        self.jobs_finished.labels(job.analysis, str(outcome)).inc()

    def observe_send(self, seconds: float) -> None:
        """Record one delivery's duration."""
        self.stage_seconds.labels("send").observe(seconds)

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        return generate_latest(self.registry)
