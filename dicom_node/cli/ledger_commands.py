"""The commands that read and change the ledger: ``status`` and ``retry``."""

from __future__ import annotations

import argparse
import json
import time

from dicom_node.cli.arguments import config_from_args
from dicom_node.errors import ConfigError
from dicom_node.service.jobs import retry_job
from dicom_node.state.ledger import LEDGER_FILE, Ledger, open_ledger


def _ledger(args: argparse.Namespace) -> Ledger:
    config = config_from_args(args)
    path = config.node.data_dir / LEDGER_FILE
    if not path.exists():
        raise ConfigError(f"no ledger at {path}: has the node run with this data directory?")
    return open_ledger(config.node.data_dir)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the recent studies and jobs, with measurements, failure reasons and deliveries."""
    ledger = _ledger(args)
    studies = ledger.study_rows(limit=args.limit)
    jobs = ledger.job_rows(limit=args.limit)
    if args.json:
        print(json.dumps({"counts": ledger.counts().to_json(), "studies": [s.to_json() for s in studies],
                          "jobs": [j.to_json() for j in jobs]}, indent=2))
        return 0
    low = ledger.counts().low_confidence
    if low:
        print(f"Low-confidence results: {low} (flagged by their analysis; check them before use)")
    print(f"Studies ({len(studies)} shown)")
    for st in studies:
        purged = ""
        if st.purged_at is not None:
            purged = time.strftime("  images deleted %Y-%m-%d %H:%M (retention)",
                                   time.localtime(st.purged_at))
        print(f"  {st.study_uid}  {st.state:<9} generation {st.generation}"
              f"  {st.instance_count} instance(s){purged}")
    print(f"Jobs ({len(jobs)} shown)")
    for job in jobs:
        sent = ", ".join(f"{d.destination}:{d.state}" for d in job.deliveries) or "-"
        print(f"  {job.uid}  {job.analysis:<12} {job.state:<14} deliveries {sent}")
        print(f"      study {job.study_uid} series {job.series_uid or '-'}")
        volumes = job.summary.get("measurements")
        if volumes:
            print("      " + "; ".join(
                f"{m['structure'] or m['name']} {m['value']:.1f} {m['unit']}" for m in volumes))
        quality = job.summary.get("quality") or {}
        if quality.get("low_confidence"):
            print(f"      LOW CONFIDENCE: {'; '.join(quality.get('reasons', []))}")
        if job.reason:
            print(f"      reason: {job.reason}")
        for d in job.deliveries:
            if d.last_error:
                print(f"      {d.destination}: {d.state} after {d.attempts} attempt(s):"
                      f" {d.last_error}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Re-queue one job (and its dead-lettered deliveries), or every dead-lettered delivery."""
    ledger = _ledger(args)
    now = time.time()
    if args.job:
        outcome = retry_job(ledger, args.job, now)
        print(f"job {args.job}: {'re-queued' if outcome.requeued else 'not re-queued'},"
              f" {outcome.redelivered} dead-lettered delivery(ies) re-queued")
        return 0 if outcome.requeued else 1
    print(f"{ledger.redeliver(now)} dead-lettered delivery(ies) re-queued")
    return 0
