"""The one wait helper: a condition with a deadline, never a bare sleep."""

from __future__ import annotations

import itertools
import time

import pytest

from atlas_devstack.waiting import WaitTimeout, wait_for, wait_for_async


def test_returns_the_first_truthy_value():
    calls = itertools.count()
    assert wait_for("the third call", lambda: next(calls) >= 2 and "done", 5, interval=0) == "done"


def test_times_out_naming_what_it_waited_for_and_the_last_error():
    def flaky():
        raise ConnectionRefusedError("not yet")

    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"timed out after 0.1s waiting for the server.*not yet"):
        wait_for("the server", flaky, 0.1, interval=0.01, retry=(OSError,))
    assert time.monotonic() - started < 2
    with pytest.raises(AssertionError):  # in a test, a timeout is a failure like any other
        wait_for("nothing", lambda: None, 0.01, interval=0.005)


def test_an_error_not_listed_in_retry_propagates_at_once():
    with pytest.raises(KeyError):
        wait_for("a status", lambda: {}["status"], 5)


def test_failed_gives_up_at_once_with_the_callers_error():
    class StackError(RuntimeError):
        pass

    started = time.monotonic()
    with pytest.raises(StackError, match="gateway exited with 1 while waiting for /readyz"):
        wait_for("/readyz", lambda: False, 30, failed=lambda: "gateway exited with 1", error=StackError)
    assert time.monotonic() - started < 1


async def test_the_async_form_awaits_coroutine_checks_and_keeps_the_loop_running():
    ticks = []

    async def ready():
        ticks.append(1)
        return len(ticks) >= 3 and len(ticks)

    assert await wait_for_async("three ticks", ready, 5, interval=0) == 3
    with pytest.raises(WaitTimeout, match="never"):
        await wait_for_async("never", lambda: False, 0.05, interval=0.01)
