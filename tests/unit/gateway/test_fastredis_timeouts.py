"""The hot-path client's timeout means silence (store/fastredis.py): calls queued behind others on
a connection whose replies keep arriving wait their turn; a connection silent for the timeout
after the oldest call was written fails it; a busy event loop is not Redis's silence."""

from __future__ import annotations

import asyncio
import time

import pytest

from atlas_gateway.store.fastredis import _Protocol, patient_wait_for

TIMEOUT = 0.2


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def connected() -> tuple[_Protocol, Transport]:
    proto = _Protocol(TIMEOUT)
    transport = Transport()
    proto.connection_made(transport)
    return proto, transport


async def test_a_queue_answered_in_turn_outlives_the_timeout():
    proto, transport = connected()
    loop = asyncio.get_running_loop()
    calls = [proto.call(b"PING") for _ in range(4)]
    # Redis answers one every 0.6 x timeout: the last reply comes at 2.4 x timeout
    for i in range(4):
        loop.call_later(0.6 * TIMEOUT * (i + 1), proto.data_received, b"+PONG\r\n")
    assert await asyncio.gather(*calls) == [b"PONG"] * 4
    assert not transport.closed


async def test_a_silent_connection_fails_the_oldest_call_and_is_dropped():
    proto, transport = connected()
    first, second = proto.call(b"PING"), proto.call(b"PING")
    with pytest.raises(TimeoutError):
        await first
    with pytest.raises(ConnectionError):
        await second
    assert transport.closed and transport.written


async def test_a_busy_event_loop_is_not_silence():
    proto, transport = connected()
    loop = asyncio.get_running_loop()
    # the loop is busy for longer than the timeout between the call and its write (the rest of a
    # burst parsed in the same turn); Redis then answers promptly
    loop.call_soon(time.sleep, 2 * TIMEOUT)
    call = proto.call(b"PING")
    loop.call_soon(lambda: loop.call_later(TIMEOUT / 4, proto.data_received, b"+PONG\r\n"))
    assert await call == b"PONG"
    assert not transport.closed


async def test_patient_wait_for_gives_an_answer_already_there_its_turn():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    # the answer arrives while the loop is blocked past the timeout
    loop.call_soon(time.sleep, 2 * TIMEOUT)
    loop.call_soon(lambda: done.set_result("connected"))
    assert await patient_wait_for(asyncio.shield(done), TIMEOUT / 2) == "connected"
    never = loop.create_future()
    with pytest.raises(asyncio.TimeoutError):
        await patient_wait_for(never, TIMEOUT / 2)
