"""Pull mode: follow an Orthanc source's change log and fetch the series an analysis would select.

For each ``StableStudy`` change, in order, the study's routed series are described from
Orthanc's tags (:meth:`OrthancSource.study_series`) and judged by every analysis' rule; only
the series some analysis would select are downloaded, instance by instance, through the REST
API (``GET /instances/ID/file``: the bytes Orthanc stored, over the same authenticated HTTP
connection, with no DICOM peer to declare in Orthanc and no second association to match to a
request, as C-MOVE would need). They are ingested exactly like C-STORE instances from the
source's AE title, so completeness from the source and the de-duplication by SOP Instance UID
apply alike: a study both pushed and pulled is analysed once. The last change handled is
recorded in the ledger after each change, so a restart resumes there and catches up in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from dicom_node.errors import RejectedInstance, SourceUnavailable
from dicom_node.receive.ingest import Ingestor
from dicom_node.receive.source import OrthancSeries, OrthancSource
from dicom_node.schedule.selection import select_series
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import Origin
from inference.base import SeriesRule

logger = logging.getLogger(__name__)

#: The change Orthanc records when a study has had no new instance for StableAge seconds.
STABLE_STUDY = "StableStudy"


class SourcePuller:
    """Follows one ``mode = "pull"`` source in a thread of its own.

    Parameters
    ----------
    source
        The source's REST client.
    ingestor
        Stores fetched instances like the SCP does.
    ledger
        Holds the source's cursor and tells which series are already complete.
    rules
        The series rules of every configured analysis (tasks run only on request).
    default_min_slices
        The node's default minimum number of slices.
    clock
        Wall-clock time source.
    """

    def __init__(
        self,
        source: OrthancSource,
        ingestor: Ingestor,
        ledger: Ledger,
        rules: Mapping[str, SeriesRule],
        default_min_slices: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.ingestor = ingestor
        self.ledger = ledger
        self.rules = dict(rules)
        self.default_min_slices = default_min_slices
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage: str | None = None

    @property
    def name(self) -> str:
        """The source's name under ``[sources]``."""
        return self.source.name

    def start(self) -> None:
        """Start following the change log."""
        self._thread = threading.Thread(target=self._loop, name=f"pull-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the change being handled; the cursor says where the next start resumes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self) -> None:
        interval = self.source.settings.poll_interval_s
        while not self._stop.is_set():
            try:
                self.poll()
            except SourceUnavailable as exc:
                if exc.reason != self._outage:  # once per outage, not once per poll
                    logger.warning("pull from source %s: %s; trying again every %g s",
                                   self.name, exc.reason, interval)
                self._outage = exc.reason
            else:
                if self._outage is not None:
                    logger.info("pull from source %s: Orthanc answers again", self.name)
                self._outage = None
            self._stop.wait(interval)

    def poll(self) -> int:
        """Handle every change after the cursor, in order; return how many studies were handled.

        Raises
        ------
        SourceUnavailable
            If Orthanc stops answering; the changes handled so far stay handled.
        """
        cursor = self.ledger.source_cursor(self.name)
        if cursor is None:
            cursor = 0 if self.source.settings.pull_from == "beginning" else self.source.last_change()
            self.ledger.set_source_cursor(self.name, cursor, self.clock())
            logger.info("pull from source %s: following its changes after index %d", self.name, cursor)
        handled = 0
        while not self._stop.is_set():
            changes, last, done = self.source.changes(cursor)
            for change in changes:
                if self._stop.is_set():
                    return handled
                if change.get("ChangeType") == STABLE_STUDY:
                    self.pull_study(str(change["ID"]))
                    handled += 1
                cursor = int(change.get("Seq", cursor))
                self.ledger.set_source_cursor(self.name, cursor, self.clock())
            if not changes and last > cursor:
                cursor = last
                self.ledger.set_source_cursor(self.name, cursor, self.clock())
            if done or not changes:
                return handled
        return handled

    def pull_study(self, orthanc_id: str) -> int:
        """Fetch the series of one stable study that an analysis would select; return how many instances.

        Series the node already holds completely (pushed, or pulled before) are not fetched
        again. A study deleted from Orthanc meanwhile is skipped.

        Raises
        ------
        SourceUnavailable
            If Orthanc stops answering (the change is handled again on the next poll).
        """
        try:
            study_uid = self.source.study_uid(orthanc_id)
            series = self.source.study_series(orthanc_id, study_uid)
        except SourceUnavailable as exc:
            if "HTTP code: 404" not in exc.reason:
                raise
            logger.info("pull from source %s: study %s is no longer in Orthanc", self.name, orthanc_id)
            return 0
        wanted = self.wanted(series)
        if not wanted:
            logger.info("pull from source %s: study %s: no analysis wants it, nothing fetched",
                        self.name, study_uid)
            return 0
        held = {info.series_uid: info.instance_count for info in self.ledger.series_of_study(study_uid)}
        fetched = 0
        started = time.perf_counter()
        for item in wanted:
            if held.get(item.info.series_uid, 0) >= item.info.instance_count:
                continue
            for instance_id in item.instance_ids:
                data = self.source.instance_file(instance_id)
                try:
                    self.ingestor.ingest_bytes(data, origin=Origin.DICOM,
                                               calling_ae_title=self.source.settings.ae_title)
                except RejectedInstance as exc:
                    # the spool cannot take it now (disk full): the change is handled again later
                    raise SourceUnavailable(self.name, f"instance {instance_id} not stored: {exc.reason}") from exc
                fetched += 1
        if fetched:
            logger.info("pull from source %s: study %s: fetched %d instance(s) of %d series in %.3f s",
                        self.name, study_uid, fetched, len(wanted), time.perf_counter() - started)
        else:
            logger.info("pull from source %s: study %s: the %d wanted series are all here already",
                        self.name, study_uid, len(wanted))
        return fetched

    def wanted(self, series: Sequence[OrthancSeries]) -> list[OrthancSeries]:
        """Return the series some analysis' rule would select, in Orthanc's order."""
        infos = [item.info for item in series]
        chosen = {
            info.series_uid
            for rule in self.rules.values()
            for info in select_series(infos, rule, self.default_min_slices).selected
        }
        return [item for item in series if item.info.series_uid in chosen]
