"""Refinery infrastructure, below the domain: config, run store and executor, lineage catalog, Spark factory,
process launchers, the Prefect server, served-endpoint access rules and effect statistics."""
