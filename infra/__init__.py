"""Refinery infrastructure: config, run store, lineage catalog, Spark factory, launchers, CLI."""
