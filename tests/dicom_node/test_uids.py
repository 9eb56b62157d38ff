"""Tests for dicom_node.uids: result UIDs are persisted identities and never change."""

from __future__ import annotations

import pytest

from dicom_node.uids import result_uid, result_uids


def test_result_uids_keep_their_values() -> None:
    # Values filed by earlier releases: a PACS that holds them must get the same UIDs again.
    assert result_uid("1.2", "1.2.3", "hippocampus", "1.0.0", "seg-series") == (
        "2.25.318403886062547362635937454799221027357"
    )
    assert result_uid("1.2.3", "1.2.3.4", "bodycomp", "2", "derived-instance", "0") == (
        "2.25.175594140892943137271266315086944723492"
    )
    assert result_uids("1.2.840.1", "1.2.840.1.2", "hippocampus", "1.0.0") == {
        "seg_series": "2.25.45646332327407938166386007780163045150",
        "seg_instance": "2.25.176849719911374745578779903814584551295",
        "sc_series": "2.25.243852525766359652589669210446861076257",
        "sc_instance": "2.25.86613457172939263850881548787081867303",
        "sr_series": "2.25.270629480851390851433892217427303651925",
        "sr_instance": "2.25.95365407659842076743128582983563864820",
        "tracking": "2.25.284280173394858923534921153689960852101",
    }


@pytest.mark.parametrize("parts", [(), ("1.2", ""), ("1.2", 3)])
def test_result_uid_needs_non_empty_string_parts(parts: tuple[object, ...]) -> None:
    with pytest.raises(ValueError, match="non-empty string parts"):
        result_uid(*parts)  # type: ignore[arg-type]
