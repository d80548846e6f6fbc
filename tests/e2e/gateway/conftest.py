"""E2E tier for the gateway: the gateway and the mock upstream as real processes on free
ports, real Redis, config written through atlas_core.contract, the official openai SDK."""

from __future__ import annotations

import json
import uuid

import openai
import pytest

from atlas_devstack.redis_server import free_port
from tests.fixtures.gateway import GatewayProcess, mock_upstream, write_key  # noqa: F401

DEAD_PORT = free_port()  # nothing listens here: the "down-*" models route to it


@pytest.fixture(scope="module")
def gateway(redis_server, mock_upstream, tmp_path_factory):  # noqa: F811
    gw = GatewayProcess(
        redis_server.url,
        mock_upstream.url,
        tmp_path_factory.mktemp("gw"),
        ATLAS_UPSTREAM_MODELS=json.dumps({"down-*": f"http://127.0.0.1:{DEAD_PORT}"}),
        ATLAS_UPSTREAM_TIMEOUT="1",
        ATLAS_MAX_BODY_BYTES="65536",
        ATLAS_SHED_THRESHOLD="2",
        ATLAS_SHED_THRESHOLD_STANDARD="50",
        ATLAS_SHED_THRESHOLD_CRITICAL="100",
        ATLAS_DEFAULT_MAX_TOKENS="256",
    ).start()
    yield gw
    gw.stop()


@pytest.fixture
def new_key(redis_url):
    """Factory: a fresh API key with the given limits; returns (api_key, name)."""

    def make(limits=None, **fields):
        name = "k-" + uuid.uuid4().hex[:10]
        api_key = "sk-atlas-" + uuid.uuid4().hex
        write_key(redis_url, api_key, name, limits, **fields)
        return api_key, name

    return make


@pytest.fixture
def sdk(gateway):
    def make(api_key: str, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=15, **kw)

    return make
