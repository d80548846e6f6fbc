"""The mock upstream's load, as vLLM reports it (mock_upstream.Slots): at most ``capacity``
requests run, the rest wait in arrival order; a waiter that leaves is no longer counted."""

from __future__ import annotations

import asyncio

from atlas_devstack.mock_upstream import Slots
from atlas_gateway.shedding.upstream_load import parse_load


def test_running_up_to_capacity_then_waiting_in_order():
    async def scenario() -> None:
        slots = Slots(capacity=2)
        order: list[int] = []

        async def request(i: int) -> None:
            await slots.acquire()
            order.append(i)

        await slots.acquire()
        await slots.acquire()
        waiters = [asyncio.ensure_future(request(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert (slots.running, slots.waiting) == (2, 3)
        assert parse_load(slots.exposition("m").decode()) == (2.0, 3.0)  # what the gateway reads
        waiters[1].cancel()  # a client that gave up waiting
        await asyncio.sleep(0)
        assert slots.waiting == 2
        slots.release()
        slots.release()
        await asyncio.gather(waiters[0], waiters[2])
        assert order == [0, 2] and (slots.running, slots.waiting) == (2, 0)
        slots.release()
        slots.release()
        assert slots.running == 0

    asyncio.run(scenario())


def test_no_capacity_means_no_queue():
    async def scenario() -> None:
        slots = Slots(capacity=0)
        for _ in range(1000):
            await slots.acquire()
        assert (slots.running, slots.waiting) == (1000, 0)

    asyncio.run(scenario())
