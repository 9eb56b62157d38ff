"""Prometheus metrics of one node: stage latencies, queue depths, instances received, job outcomes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.receive.scp import ReceiveCounters
from dicom_node.service.jobs import fleet_of
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import STAGES, DeliveryState, JobRecord, JobState, Origin, StudyRecord, StudyState

logger = logging.getLogger(__name__)

#: Seconds: from a fast C-STORE of one instance to a slow model on a large study.
BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _LedgerCollector(Collector):
    """Queue depths and ingress counts read at scrape time, so they survive restarts."""

    def __init__(self, ledger: Ledger, receive_counters: Callable[[], Mapping[Origin, ReceiveCounters]],
                 stalled_after_s: float) -> None:
        self.ledger = ledger
        self.receive_counters = receive_counters
        self.stalled_after_s = stalled_after_s

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
        yield from _fleet_metrics(self.ledger, self.stalled_after_s)
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


def _fleet_metrics(ledger: Ledger, stalled_after_s: float) -> Iterator[Metric]:
    """The job queue of the scaled-out mode: jobs per queue and status, workers and heartbeats."""
    fleet = fleet_of(ledger, stalled_after_s)
    if fleet is None:
        return
    queued = GaugeMetricFamily("dicom_node_queue_jobs", "Jobs in the job queue, by queue and status"
                               " (todo, doing, stalled, retrying, dead)", labels=["queue", "status"])
    for name, depth in sorted(fleet["queues"].items()):
        for status, count in sorted(depth.items()):
            queued.add_metric([name, status], count)
    yield queued
    registered = fleet["workers"]
    yield GaugeMetricFamily("dicom_node_workers", "Registered queue workers", value=len(registered))
    labels = ["worker", "host", "device", "pid"]
    age = GaugeMetricFamily("dicom_node_worker_heartbeat_age_seconds",
                            "Seconds since each worker's last heartbeat", labels=labels)
    busy = GaugeMetricFamily("dicom_node_worker_busy", "1 while a worker runs a job, else 0",
                             labels=[*labels, "analysis"])
    for worker in registered:
        values = [str(worker["id"]), worker["host"] or "", worker["device"] or "",
                  "" if worker["pid"] is None else str(worker["pid"])]
        age.add_metric(values, worker["heartbeat_age_s"])
        busy.add_metric([*values, worker["analysis"] or ""], 1 if worker["job_uid"] else 0)
    yield age
    yield busy


class NodeMetrics:
    """The node's metrics in a registry of its own (no process-global state).

    Parameters
    ----------
    ledger
        Read at scrape time for queue depths and job states.
    receive_counters
        Returns ``{origin: ReceiveCounters}`` for every way instances come in.
    stalled_after_s
        Scaled out: ``queue.stalled_after_s``, when a silent worker's job counts as stalled.
    """

    def __init__(self, ledger: Ledger, receive_counters: Callable[[], Mapping[Origin, ReceiveCounters]],
                 *, stalled_after_s: float = 30.0) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "dicom_node_stage_seconds", "Duration of each stage of a job", ["stage"],
            buckets=BUCKETS_S, registry=self.registry,
        )
        self.jobs_finished = Counter(
            "dicom_node_jobs_finished", "Jobs finished since start, by analysis and outcome",
            ["analysis", "outcome"], registry=self.registry,
        )
        self.registry.register(_LedgerCollector(ledger, receive_counters, stalled_after_s))

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
