"""Thin route modules, one per API area."""
