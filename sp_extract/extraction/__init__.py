"""Extraction, stage by stage: discover -> decode -> loader (batches) -> model and backends
(network) -> postprocess; pipeline runs them into the store."""
