"""Find a patient's prior results of an analysis: in the node's ledger, and as this node's SRs in the PACS."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
import pyorthanc
from pydicom.dataset import Dataset

from dicom_node.state.ledger import LEDGER_FILE, open_ledger
from dicom_node.state.records import JobState
from reports.identity import Identity

logger = logging.getLogger(__name__)

#: SR content: Measurement Group (DCM 125007), Tracking Identifier (DCM 112039),
#: Algorithm Name (DCM 111001), Algorithm Version (DCM 111003).
MEASUREMENT_GROUP = "125007"
TRACKING_IDENTIFIER = "112039"
ALGORITHM_NAME = "111001"
ALGORITHM_VERSION = "111003"
#: Groups this node writes about the change itself; never read back as measurements.
CHANGE_PREFIX = "Change since prior study"
MAX_LEDGER_JOBS = 5000


@dataclass(frozen=True)
class PriorResult:
    """One prior result: the study, its date, the model, its measurements by key, its SR.

    ``values`` keys are ``"<group>|<concept code>|<unit>"`` as
    :func:`reports.comparison.measurement_key` makes them; ``origin`` is ``"ledger"`` or
    ``"PACS"``.
    """

    study_instance_uid: str
    study_date: str
    model_name: str
    model_version: str
    values: dict[str, float] = field(default_factory=dict)
    sr_series_instance_uid: str = ""
    sr_sop_instance_uid: str = ""
    origin: str = "ledger"


@dataclass(frozen=True)
class PriorSources:
    """Where a worker looks for prior results; plain values, so it crosses processes.

    Parameters
    ----------
    data_dir
        The node's data directory (its ledger), or ``None``.
    pacs_url
        Orthanc's REST root, e.g. ``http://pacs:8042``, or ``None``.
    timeout_s
        Timeout of each request to the PACS.
    manufacturer
        The Manufacturer this node writes into its SRs; only such SRs are read.
    """

    data_dir: str | None
    pacs_url: str | None
    timeout_s: float = 10.0
    manufacturer: str = Identity.manufacturer  # what identity_for writes into every result


def find_prior_results(
    sources: PriorSources, analysis: str, model_name: str, patient_id: str, study_uid: str
) -> list[PriorResult]:
    """Every prior result of ``analysis`` for ``patient_id`` except of ``study_uid``.

    The ledger is read first; the PACS adds the studies the ledger does not know (after a
    wiped data folder, or results of another node). A PACS that cannot be reached is logged
    and skipped: the result then says what was found, never fails.

    Returns
    -------
    list of PriorResult
        One per prior study, any order.
    """
    if not patient_id:
        return []
    found: dict[str, PriorResult] = {}
    if sources.data_dir is not None:
        for prior in priors_from_ledger(Path(sources.data_dir), analysis, patient_id, study_uid):
            found.setdefault(prior.study_instance_uid, prior)
    if sources.pacs_url:
        try:
            for prior in priors_from_orthanc(sources, model_name, patient_id, study_uid):
                found.setdefault(prior.study_instance_uid, prior)
        except (OSError, ValueError) as exc:
            logger.warning("prior results: PACS at %s not searched: %s", sources.pacs_url, exc)
    logger.info("prior results for study %s: %d found", study_uid, len(found))
    return list(found.values())


def priors_from_ledger(data_dir: Path, analysis: str, patient_id: str, study_uid: str) -> list[PriorResult]:
    """The node's own finished results of ``analysis`` for the patient, newest per study."""
    if not (data_dir / LEDGER_FILE).exists():
        return []
    ledger = open_ledger(data_dir)
    try:
        jobs = ledger.job_rows(analysis=analysis, state=JobState.DONE, limit=MAX_LEDGER_JOBS)
    finally:
        ledger.close()
    priors: dict[str, PriorResult] = {}
    for job in jobs:
        summary = job.summary
        if summary.get("patient_id") != patient_id or job.study_uid == study_uid:
            continue
        values = {m["key"]: float(m["value"]) for m in summary.get("measurements", []) if m.get("key")}
        if not values or not summary.get("study_date"):
            continue
        uids = summary.get("result_uids", {})
        priors.setdefault(job.study_uid, PriorResult(
            study_instance_uid=job.study_uid, study_date=str(summary["study_date"]),
            model_name=str(summary.get("model_name", "")), model_version=str(summary.get("model_version", "")),
            values=values, sr_series_instance_uid=str(uids.get("sr_series", "")),
            sr_sop_instance_uid=str(uids.get("sr_instance", "")), origin="ledger",
        ))
    return list(priors.values())


def _client(sources: PriorSources) -> pyorthanc.Orthanc:
    # no keep-alive: Orthanc closes idle connections after about a second (see receive/source.py)
    return pyorthanc.Orthanc(sources.pacs_url or "", timeout=sources.timeout_s,
                             limits=httpx.Limits(max_keepalive_connections=0))


def priors_from_orthanc(
    sources: PriorSources, model_name: str, patient_id: str, study_uid: str
) -> list[PriorResult]:
    """This node's SRs for the patient in Orthanc (REST ``/tools/find``), read back as results.

    Raises
    ------
    OSError
        If Orthanc cannot be reached or answers with an error.
    ValueError
        If its answer is not the JSON expected.
    """
    query: dict[str, object] = {"Level": "Instance", "Query": {"PatientID": patient_id, "Modality": "SR"}}
    client = _client(sources)
    try:
        ids = client.post_tools_find(json=query)
        if not isinstance(ids, list):
            raise ValueError("/tools/find did not return a list")
        files = []
        for instance_id in ids:
            data = client.get_instances_id_file(str(instance_id))
            if not isinstance(data, bytes):
                raise ValueError(f"/instances/{instance_id}/file did not return a file")
            files.append(data)
    except httpx.HTTPStatusError as exc:
        raise OSError(f"{exc.request.url.path} answered {exc.response.status_code}") from None
    except httpx.HTTPError as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from None
    finally:
        client.close()
    priors: dict[str, PriorResult] = {}
    for data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        if str(ds.get("StudyInstanceUID", "")) == study_uid:
            continue
        if str(ds.get("Manufacturer", "")) != sources.manufacturer:
            continue
        prior = read_prior_sr(ds)
        if prior is None or prior.model_name != model_name:
            continue
        current = priors.get(prior.study_instance_uid)
        if current is None or prior.sr_sop_instance_uid > current.sr_sop_instance_uid:
            priors[prior.study_instance_uid] = prior
    return list(priors.values())


def _items(sequence: Iterable[Dataset]) -> Iterator[Dataset]:
    for item in sequence:
        yield item
        yield from _items(item.get("ContentSequence", []))


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue) if item.get("ConceptNameCodeSequence") else ""


def read_prior_sr(ds: Dataset) -> PriorResult | None:
    """Read a TID 1500 report of this node back: study, date, model and measurements by key.

    Returns
    -------
    PriorResult or None
        ``None`` when the document holds no measurement groups with numeric values.
    """
    values: dict[str, float] = {}
    model_name = model_version = ""
    for group in _items(ds.get("ContentSequence", [])):
        if group.get("ValueType") != "CONTAINER" or _code(group) != MEASUREMENT_GROUP:
            continue
        children = list(group.get("ContentSequence", []))
        tracking = next((str(c.TextValue) for c in children if _code(c) == TRACKING_IDENTIFIER
                         and c.get("ValueType") == "TEXT"), "")
        if not tracking or tracking.startswith(CHANGE_PREFIX):
            continue
        for child in _items(children):
            if _code(child) == ALGORITHM_NAME:
                model_name = str(child.TextValue)
            elif _code(child) == ALGORITHM_VERSION:
                model_version = str(child.TextValue)
        for child in children:
            if child.get("ValueType") != "NUM" or not child.get("MeasuredValueSequence"):
                continue
            measured = child.MeasuredValueSequence[0]
            unit = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
            values[f"{tracking}|{_code(child)}|{unit}"] = float(measured.NumericValue)
    if not values:
        return None
    return PriorResult(
        study_instance_uid=str(ds.StudyInstanceUID), study_date=str(ds.get("StudyDate", "")),
        model_name=model_name, model_version=model_version, values=values,
        sr_series_instance_uid=str(ds.SeriesInstanceUID), sr_sop_instance_uid=str(ds.SOPInstanceUID),
        origin="PACS",
    )
