"""Refinery evaluation."""
