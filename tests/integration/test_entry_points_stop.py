"""`python -m atlas_devstack.redis_server` and `python -m atlas_devstack.mock_upstream`, run as a
user runs them: a signal stops them and whatever they started (exit 128+N), a dead child ends
the entry point with exit 1, and nothing is left listening."""

from __future__ import annotations

import os
import signal

import pytest

from atlas_devstack.redis_server import free_port, redis_server_binary
from atlas_devstack.waiting import wait_for
from tests.fixtures.leftovers import SIGNALS, EntryPoint, listening_ports

# Like the redis fixtures: skipped without redis-server, except under CI (nothing is skipped there).
needs_redis = pytest.mark.skipif(
    redis_server_binary() is None and not os.environ.get("CI"),
    reason="redis-server not installed: run `make system-deps`",
)


@pytest.fixture
def entry_points():
    started: list[EntryPoint] = []
    yield started
    for ep in started:
        ep.kill()


def _start(entry_points, tmp_path, module, *args, ready: str) -> tuple[EntryPoint, dict[int, str], set[int]]:
    ep = EntryPoint(tmp_path, module, *args)
    entry_points.append(ep)
    ep.wait_output(ready, timeout=30)
    children = ep.descendants()
    return ep, children, listening_ports(set(children))


@needs_redis
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("persistent", [False, True], ids=["ephemeral", "dir"])
def test_redis_server_stops_redis_on_signal(entry_points, tmp_path, sig, persistent):
    args = ["--dir", str(tmp_path / "redis")] if persistent else []
    ep, children, ports = _start(
        entry_points, tmp_path, "atlas_devstack.redis_server", *args, ready="export REDIS_URL="
    )
    assert any("redis-server" in cmd for cmd in children.values()), children
    assert ports, "redis-server listens somewhere"
    ep.signal(sig)
    assert ep.wait_exit(30) == 128 + sig
    ep.assert_nothing_left(ports)
    if persistent:
        assert not (tmp_path / "redis" / "redis.pid").exists()


@needs_redis
def test_redis_server_exits_non_zero_when_redis_dies(entry_points, tmp_path):
    ep, children, ports = _start(entry_points, tmp_path, "atlas_devstack.redis_server", ready="export REDIS_URL=")
    (redis_pid,) = [pid for pid, cmd in children.items() if "redis-server" in cmd]
    os.kill(redis_pid, signal.SIGKILL)
    assert ep.wait_exit(30) == 1
    assert "redis-server was killed by SIGKILL" in ep.output
    ep.assert_nothing_left(ports)


@pytest.mark.parametrize("sig", [*SIGNALS, signal.SIGHUP], ids=lambda s: s.name)
def test_mock_upstream_stops_on_signal(entry_points, tmp_path, sig):
    port = free_port()
    ep = EntryPoint(tmp_path, "atlas_devstack.mock_upstream", "--port", str(port))
    entry_points.append(ep)
    wait_for("the mock to listen", lambda: port in listening_ports({ep.proc.pid}), 30, interval=0.05)
    ep.signal(sig)
    # uvicorn turns a hang-up into the SIGTERM it handles gracefully
    assert ep.wait_exit(30) == 128 + (signal.SIGTERM if sig == signal.SIGHUP else sig)
    ep.assert_nothing_left({port})
