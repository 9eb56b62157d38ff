"""State: the ledger of instances, studies, jobs and deliveries, its schema and typed records."""
