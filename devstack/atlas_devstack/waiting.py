"""Waiting until a condition holds, with a deadline: the one way the dev stack, the deploy
stack, the benchmarks and every test tier wait for something (never a bare sleep).

``wait_for("the gateway's /readyz", ready, 60)`` calls ``ready`` every ``interval`` seconds
until it returns something truthy, and returns that; after ``timeout`` seconds it raises
``error`` naming what it waited for. ``failed`` names a reason to give up at once (a process
that exited) or returns None; ``retry`` lists the exceptions of the check that mean "not yet"
(the last one is named in the timeout's message; any other propagates at once).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Awaitable, Callable, TypeVar, Union

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold in time (an AssertionError: in a test, a failure like any other)."""


def _give_up(error: Callable[[str], Exception], what: str, timeout: float, last: BaseException | None) -> Exception:
    return error(f"timed out after {timeout:g}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


def wait_for(
    what: str,
    check: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.02,
    failed: Callable[[], str | None] | None = None,
    retry: tuple[type[BaseException], ...] = (),
    error: Callable[[str], Exception] = WaitTimeout,
) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        reason = failed() if failed is not None else None
        if reason:
            raise error(f"{reason} while waiting for {what}")
        try:
            result = check()
        except retry as exc:
            last, result = exc, None
        if result:
            return result
        if time.monotonic() > deadline:
            raise _give_up(error, what, timeout, last)
        time.sleep(interval)


async def wait_for_async(
    what: str,
    check: Callable[[], Union[T, Awaitable[T]]],
    timeout: float,
    *,
    interval: float = 0.02,
    retry: tuple[type[BaseException], ...] = (),
    error: Callable[[str], Exception] = WaitTimeout,
) -> T:
    """:func:`wait_for` inside an event loop: ``check`` may be a coroutine function, and the loop
    runs while it waits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except retry as exc:
            last, result = exc, None
        if result:
            return result
        if loop.time() > deadline:
            raise _give_up(error, what, timeout, last)
        await asyncio.sleep(interval)
