"""Run: worker processes per device and the pipeline step from a series to result files."""
