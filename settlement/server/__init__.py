"""The running service: its settings, its wiring of store, chain, indexer, ingest and engine, its metrics and
the operator's key."""
