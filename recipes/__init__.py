"""Runnable recipes over the tinker SDK (importable as `recipes.<name>` from the repo root, e.g. by tests and bench/)."""
