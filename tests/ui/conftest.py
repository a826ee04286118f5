"""The console tests share the e2e tests' tiny base and engine."""

from tests.e2e.conftest import tiny_pair  # noqa: F401  (a fixture)
