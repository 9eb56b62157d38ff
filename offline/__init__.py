"""Offline tools: analyses of study folders, batch runs, conversion and training commands, outside the running node."""
