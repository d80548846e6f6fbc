"""Integration tier: real redis-server (session fixture from tests/fixtures/redis.py) plus
gateway / mock-upstream processes where the failure modes need them."""

from tests.fixtures.gateway import mock_upstream, start_gateway, strict_upstream  # noqa: F401  (fixtures)
