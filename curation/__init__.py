"""Refinery curation."""
