"""The throwaway PostgreSQL cluster of the tests (deploy/local/postgres_cluster.py), under the name the tests use."""

from __future__ import annotations

from deploy.local.postgres_cluster import PASSWORD, Cluster, binaries, free_port, running_cluster, skip_reason

__all__ = ["PASSWORD", "Cluster", "binaries", "free_port", "running_cluster", "skip_reason"]
