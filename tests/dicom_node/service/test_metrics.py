"""Metrics as Prometheus text: stage histograms, job outcomes, queue depths, ingress counts."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from dicom_node.receive.ingest import series_attributes
from dicom_node.state.records import InstanceRecord, PlannedJob
from dicom_node.state.sqlite import SqliteLedger
from dicom_node.service.metrics import NodeMetrics
from dicom_node.receive.scp import ReceiveCounters


def test_metrics_parse_and_count(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.record_instance(InstanceRecord("1.2.3.1", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                                          "/spool/x.dcm", 10, "ORTHANC", 1.0),
                          series_attributes(Dataset()))
    ledger.complete_study("1.2", 3.0, [PlannedJob("a", "1.2.3")])
    counters = ReceiveCounters()
    counters.add_stored(10)
    counters.add_rejected("0xC000 cannot understand")
    counters.add_refused_connection("association_limit")
    counters.add_refused_connection("association_limit")
    metrics = NodeMetrics(ledger, lambda: {"dicom": counters})
    job = ledger.claim_next_job(4.0, ["a"])
    assert job is not None
    ledger.finish_job(job.id, 6.0, state="done", timings={"infer": 1.5, "report": 0.2},
                      summary={"quality": {"low_confidence": True, "reasons": ["image and mirror disagree"]}})
    finished = ledger.job(job.uid)
    assert finished is not None
    metrics.observe_job(finished, ledger.study("1.2"), "done")
    metrics.observe_send(0.3)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("dicom_node_stage_seconds_count", (("stage", "infer"),))] == 1
    assert samples[("dicom_node_stage_seconds_sum", (("stage", "wait"),))] == 2.0
    assert samples[("dicom_node_stage_seconds_sum", (("stage", "queue"),))] == 1.0
    assert samples[("dicom_node_stage_seconds_count", (("stage", "send"),))] == 1
    assert samples[("dicom_node_jobs_finished_total", (("analysis", "a"), ("outcome", "done")))] == 1
    assert samples[("dicom_node_jobs", (("state", "done"),))] == 1
    assert samples[("dicom_node_results_low_confidence", ())] == 1
    assert samples[("dicom_node_queue_depth", (("queue", "jobs"),))] == 0
    assert samples[("dicom_node_instances_received_total", (("origin", "dicom"),))] == 1
    assert samples[("dicom_node_instances_rejected_total",
                    (("origin", "dicom"), ("reason", "0xC000 cannot understand")))] == 1
    assert samples[("dicom_node_connections_refused_total", (("reason", "association_limit"),))] == 2
