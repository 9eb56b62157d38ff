"""The commands that read and change the ledger: ``status``, ``retry`` and ``db upgrade``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dicom_node.cli.arguments import config_from_args
from dicom_node.config import NodeConfig
from dicom_node.errors import ConfigError
from dicom_node.service.jobs import fleet_of, retry_job
from dicom_node.state.ledger import LEDGER_FILE, Ledger, open_ledger, upgrade_ledger
from dicom_node.state.queue import job_queues


def _ledger(config: NodeConfig) -> Ledger:
    path = config.node.data_dir / LEDGER_FILE
    if config.state.backend == "sqlite" and not path.exists():
        raise ConfigError(f"no ledger at {path}: has the node run with this data directory?")
    # with the queues, so that a job queued again here also enters the job queue
    queues = job_queues(config) if config.state.backend == "postgresql" else None
    return open_ledger(config.node.data_dir, config.state, queues=queues)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create the configured ledger's schema, or migrate it to this version (safe to repeat)."""
    config = config_from_args(args)
    where = (str(config.node.data_dir / LEDGER_FILE) if config.state.backend == "sqlite"
             else str(config.state.dsn))
    before, after = upgrade_ledger(config.node.data_dir, config.state)
    if before is None:
        print(f"{config.state.backend} ledger at {where}: created at schema version {after}")
    elif before == after:
        print(f"{config.state.backend} ledger at {where}: already at schema version {after}")
    else:
        print(f"{config.state.backend} ledger at {where}: migrated from schema version {before}"
              f" to {after}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the fleet (scaled out), then the recent studies and jobs, with measurements, failure reasons and deliveries."""
    config = config_from_args(args)
    ledger = _ledger(config)
    try:
        return _print_status(ledger, args, config.queue.stalled_after_s)
    finally:
        ledger.close()


def _print_status(ledger: Ledger, args: argparse.Namespace, stalled_after_s: float) -> int:
    studies = ledger.study_rows(limit=args.limit)
    jobs = ledger.job_rows(limit=args.limit)
    fleet = fleet_of(ledger, stalled_after_s)
    if args.json:
        shown = {"counts": ledger.counts().to_json(), "studies": [s.to_json() for s in studies],
                 "jobs": [j.to_json() for j in jobs]}
        if fleet is not None:
            shown["fleet"] = fleet
        print(json.dumps(shown, indent=2))
        return 0
    if fleet is not None:
        _print_fleet(fleet)
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


def _print_fleet(fleet: dict[str, Any]) -> None:
    print("Queues (waiting / running / stalled / retrying / dead)")
    for name, depth in sorted(fleet["queues"].items()):
        print(f"  {name:<32} {depth['todo']:>4} / {depth['doing']} / {depth['stalled']}"
              f" / {depth['retrying']} / {depth['dead']}")
    if not fleet["queues"]:
        print("  (empty)")
    print(f"Workers ({len(fleet['workers'])})")
    for worker in fleet["workers"]:
        who = (f"{worker['host']} {worker['device']} pid {worker['pid']}" if worker["host"]
               else "(identity not recorded yet)")
        doing = (f"job {worker['job_uid']}: {worker['analysis']} of study {worker['study_uid']}"
                 f" ({worker['queue']})" if worker["job_uid"] else "idle")
        silent = "  SILENT" if worker["silent"] else ""
        print(f"  worker {worker['id']}  {who}  heartbeat {worker['heartbeat_age_s']:.0f} s ago{silent}"
              f"  {doing}")
        if worker["analyses"]:
            print(f"      analyses: {', '.join(worker['analyses'])}")


def cmd_retry(args: argparse.Namespace) -> int:
    """Re-queue one job (and its dead-lettered deliveries), or every dead-lettered delivery."""
    ledger = _ledger(config_from_args(args))
    try:
        return _retry(ledger, args)
    finally:
        ledger.close()


def _retry(ledger: Ledger, args: argparse.Namespace) -> int:
    now = time.time()
    if args.job:
        outcome = retry_job(ledger, args.job, now)
        print(f"job {args.job}: {'re-queued' if outcome.requeued else 'not re-queued'},"
              f" {outcome.redelivered} dead-lettered delivery(ies) re-queued")
        return 0 if outcome.requeued else 1
    print(f"{ledger.redeliver(now)} dead-lettered delivery(ies) re-queued")
    return 0
