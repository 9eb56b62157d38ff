"""Finds analysis plugins by name: entry points in the ``dicom_node.analyses`` group, or ``module:Class``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from dicom_node.config import AnalysisSettings
from dicom_node.errors import ConfigError
from inference.base import Analysis

ENTRY_POINT_GROUP = "dicom_node.analyses"


def available_plugins() -> dict[str, str]:
    """Return the installed plugin names and the objects they point to."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _resolve(plugin: str) -> Any:
    if ":" in plugin:
        module_name, _, attribute = plugin.partition(":")
        return getattr(importlib.import_module(module_name), attribute)
    matches = entry_points(group=ENTRY_POINT_GROUP, name=plugin)
    if not matches:
        known = ", ".join(sorted(available_plugins())) or "none installed"
        raise ConfigError(f"analysis plugin {plugin!r} is not installed (known: {known})")
    return next(iter(matches)).load()


def create_analysis(name: str, settings: AnalysisSettings) -> Analysis:
    """Instantiate one configured analysis (cheap: models load later, in the workers).

    Raises
    ------
    ConfigError
        If the plugin cannot be found or rejects its options.
    """
    try:
        factory = _resolve(settings.plugin)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"analyses.{name}.plugin: cannot load {settings.plugin!r}: {exc}") from None
    try:
        analysis = factory(**settings.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"analyses.{name}.options: {exc}") from None
    if not isinstance(analysis, Analysis):
        raise ConfigError(f"analyses.{name}.plugin: {settings.plugin!r} is not an analysis")
    return analysis


def create_analyses(analyses: Mapping[str, AnalysisSettings]) -> dict[str, Analysis]:
    """Instantiate every enabled analysis of a configuration."""
    return {
        name: create_analysis(name, settings)
        for name, settings in analyses.items()
        if settings.enabled
    }
