from __future__ import annotations

import logging

import pytest

from dicom_node.receive.admission import RateLimitedLog


def test_rate_limited_log_holds_back_repeats_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    now = [100.0]
    log = RateLimitedLog(interval_s=10.0, clock=lambda: now[0])
    for _ in range(5):
        log.warning("limit:10.0.0.1", "rejected association from %s", "10.0.0.1")
    log.warning("limit:10.0.0.2", "rejected association from %s", "10.0.0.2")
    now[0] += 10.0
    log.warning("limit:10.0.0.1", "rejected association from %s", "10.0.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        "rejected association from 10.0.0.1",
        "rejected association from 10.0.0.2",
        "rejected association from 10.0.0.1 (4 more like this in the last 10 s)",
    ]
