"""DIMSE status codes the node answers and understands, as named constants (PS3.4 Annex B, PS3.7 C)."""

from __future__ import annotations

SUCCESS = 0x0000

#: C-STORE "Refused: Out of Resources" (PS3.4 Table B.2-1), e.g. the spool disk is full.
OUT_OF_RESOURCES = 0xA700
#: C-STORE "Error: Data Set does not match SOP Class".
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: C-STORE "Error: Cannot understand": the data set could not be decoded.
CANNOT_UNDERSTAND = 0xC000
#: "Cannot understand" sub-code used for missing or malformed identifying UIDs.
INVALID_IDENTIFIERS = 0xC001
#: "Cannot understand" sub-code used when the instance could not be stored for another reason.
PROCESSING_FAILURE = 0x0110

#: Warning statuses a Storage SCP may return; the instance is stored (PS3.4 B.2.3).
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})

_DESCRIPTIONS = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    INVALID_IDENTIFIERS: "Error: Cannot understand (invalid identifiers)",
    PROCESSING_FAILURE: "Failure: Processing failure",
    0xB000: "Warning: Coercion of data elements",
    0xB006: "Warning: Elements discarded",
    0xB007: "Warning: Data Set does not match SOP Class",
}


def is_stored(status: int) -> bool:
    """Return whether a C-STORE status means the peer kept the instance (success or warning)."""
    return status == SUCCESS or status in WARNING_STATUSES


def describe(status: int) -> str:
    """Return a readable description of a DIMSE status, with its hex code."""
    text = _DESCRIPTIONS.get(status)
    if text is None:
        category = {0xA: "Refused/Error", 0xC: "Error", 0xB: "Warning", 0xF: "Pending"}
        text = category.get(status >> 12, "Failure")
    return f"0x{status:04X} {text}"
