from __future__ import annotations

import fakeredis
import pytest

from .fakes import FakeKube


@pytest.fixture
async def redis():
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()
