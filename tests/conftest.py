"""Fixtures shared by every tier live in tests/fixtures/; this file only registers them."""

pytest_plugins = [
    "tests.fixtures.redis",
    "tests.fixtures.cluster",
    "tests.fixtures.daemons",
    "tests.fixtures.timings",
    "tests.fixtures.jaeger",
]
