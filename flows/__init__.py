"""Prefect flows: one flow per stage (flows.stages), the parent pipeline (flows.pipeline), deployments (flows.serve)."""
