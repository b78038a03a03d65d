"""Refinery flows."""
