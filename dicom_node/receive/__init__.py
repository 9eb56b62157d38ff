"""Receive: the Storage SCP, the watch folder, ingest and the spool of instance files."""
