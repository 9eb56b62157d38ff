"""Service: the node's wiring, the job service, the HTTP API, status page and metrics."""
