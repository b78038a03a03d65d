"""The application layer: the `refinery` command (flows.cli), Prefect flows per stage (flows.stages), the
parent pipeline (flows.pipeline), deployments (flows.serve), sweeps (flows.sweep), the run report
(flows.report) and the lineage explorer (flows.explorer)."""
