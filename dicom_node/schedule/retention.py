"""Spool retention: the images of studies idle for ``node.retention_days`` leave the spool."""

from __future__ import annotations

import logging

from dicom_node.receive.spool import Spool
from dicom_node.state.ledger import Ledger

logger = logging.getLogger(__name__)

#: How often the node applies the retention, in seconds.
PURGE_INTERVAL_S = 600.0


def purge_expired(spool: Spool, ledger: Ledger, retention_days: float, now: float) -> int:
    """Delete the instances of studies idle for ``retention_days``; return how many studies.

    Results, ``result.json`` and the ledger's history stay. Files go first, then the
    ledger rows: a crash in between leaves rows whose files are gone, purged again on
    the next pass, never files without rows, which start-up recovery would take for
    newly received instances and analyse again. ``retention_days`` 0 keeps everything.
    """
    if retention_days <= 0:
        return 0
    purged = 0
    for study_uid in ledger.studies_to_purge(now - retention_days * 86400.0):
        try:
            spool.remove_study(study_uid)
        except (OSError, ValueError) as exc:
            logger.error("retention: cannot delete study %s from the spool: %s", study_uid, exc)
            continue
        count = ledger.forget_instances(study_uid, now)
        purged += 1
        logger.info("retention: study %s removed from the spool (%d instances, idle for %g days)",
                    study_uid, count, retention_days)
    return purged
