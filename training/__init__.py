"""Refinery training."""
