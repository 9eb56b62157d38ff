"""The status page: one HTML document whose script reads the node's API (studies, jobs, failures, retry)."""

from __future__ import annotations

import html
from importlib import resources


def render_status_page(ae_title: str) -> str:
    """Return the status page HTML for a node called ``ae_title`` (escaped; data come from the API)."""
    template = resources.files("dicom_node").joinpath("static", "status.html").read_text(encoding="utf-8")
    return template.replace("{{AE_TITLE}}", html.escape(ae_title))
