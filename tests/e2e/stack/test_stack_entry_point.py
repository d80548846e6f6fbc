"""`python -m atlas_devstack up|down` (make dev-up / dev-down), run as a user runs it: a signal
or a failure during `up` stops what it had started; `down` leaves no process, port or mount,
and `.dev/env` then says the stack is down instead of pointing at dead ports."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from atlas_devstack.waiting import wait_for
from tests.fixtures.cluster import require_tools
from tests.fixtures.leftovers import SIGNALS, EntryPoint, listening_ports

pytestmark = pytest.mark.e2e
MODULE = "atlas_devstack"
SERVICES = ("redis-server", "etcd", "kube-apiserver", "atlas_operator", "atlas_gateway", "mock_upstream", "oidc_issuer")


@pytest.fixture
def entry_points():
    require_tools()
    started: list[EntryPoint] = []
    yield started
    for ep in started:
        ep.kill()


def _up(entry_points, tmp_path) -> tuple[EntryPoint, object]:
    state = tmp_path / "dev"
    # A dev stack of its own: no upstream or Redis from the caller's environment.
    ep = EntryPoint(tmp_path, MODULE, "--state-dir", str(state), "up", env={"ATLAS_UPSTREAM_URL": "", "REDIS_URL": ""})
    entry_points.append(ep)
    return ep, state


def _running(ep: EntryPoint) -> set[str]:
    return {name for cmd in ep.descendants().values() for name in SERVICES if name in cmd}


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_during_up_stops_what_it_started(entry_points, tmp_path, sig):
    ep, state = _up(entry_points, tmp_path)
    # The gateway is the last process `up` starts; it then still waits for it, the operator and
    # the demo key, which takes seconds.
    wait_for("the gateway to be started", lambda: (state / "gateway.pid").exists(), 120, interval=0.01)
    assert set(SERVICES) <= _running(ep), ep.descendants()
    ports = listening_ports(set(ep.descendants()))
    assert len(ports) >= 4, ports  # redis, etcd (2), kube-apiserver, mock upstream
    ep.signal(sig)
    assert ep.wait_exit() == 128 + sig, ep.output
    assert f"[dev-up] {sig.name}: stopped" in ep.output
    ep.assert_nothing_left(ports, state)
    assert not list(state.glob("**/*.pid"))


@pytest.mark.parametrize(
    "pidfile, name",
    [("controlplane/kube-apiserver.pid", "kube-apiserver"), ("gateway.pid", "gateway")],
    ids=["kube-apiserver", "gateway"],
)
def test_a_dead_child_fails_up_at_once_and_stops_the_rest(entry_points, tmp_path, pidfile, name):
    ep, state = _up(entry_points, tmp_path)
    wait_for(f"{name} to be started", (state / pidfile).exists, 120, interval=0.01)
    ports = listening_ports(set(ep.descendants()))
    os.kill(int((state / pidfile).read_text()), signal.SIGKILL)
    assert ep.wait_exit(30) == 1, ep.output  # not after a 60 s wait for something that cannot come
    # said by the control plane (while starting) or by `up` (while waiting for the rest)
    assert f"{name} exited with -9" in ep.output or f"{name} was killed by SIGKILL" in ep.output, ep.output
    ep.assert_nothing_left(ports, state)


def test_down_stops_everything_and_invalidates_the_env_file(entry_points, tmp_path):
    ep, state = _up(entry_points, tmp_path)
    assert ep.wait_exit(240) == 0, ep.output
    env_file = state / "env"
    source = [
        "bash",
        "-c",
        f'. {env_file}; echo "rc=$? gateway=${{ATLAS_GATEWAY_URL:-}} '
        'key=${ATLAS_DEMO_KEY:-} kubeconfig=${KUBECONFIG:-}"',
    ]
    before = subprocess.run(source, capture_output=True, text=True).stdout
    assert "rc=0 gateway=http://127.0.0.1:" in before and "key=sk-atlas-" in before
    # Detached by design: `up` has exited and the stack runs on. redis-server writes its title
    # over its environment (no mark left): it is known by its pidfile.
    ep.remember(int((state / "redis" / "redis.pid").read_text()))
    running = ep.left_behind()
    assert set(SERVICES) <= {n for cmd in running.values() for n in SERVICES if n in cmd}, running
    ports = listening_ports(set(running))
    assert len(ports) >= 5, ports

    down = subprocess.run(
        [*ep.proc.args[:2], MODULE, "--state-dir", str(state), "down"], capture_output=True, text=True, timeout=120
    )
    assert down.returncode == 0, down.stderr
    ep.assert_nothing_left(ports, state)

    # Sourced in a shell that had the old values: it says so, unsets them, returns 1.
    stale = dict(line.split("=", 1) for line in before.split()[1:])
    after = subprocess.run(
        [
            "bash",
            "-c",
            f'. {env_file}; echo "rc=$? gateway=${{ATLAS_GATEWAY_URL:-}} '
            'key=${ATLAS_DEMO_KEY:-} kubeconfig=${KUBECONFIG:-}"',
        ],
        env={
            "PATH": os.environ["PATH"],
            "ATLAS_GATEWAY_URL": stale["gateway"],
            "ATLAS_DEMO_KEY": stale["key"],
            "KUBECONFIG": stale["kubeconfig"],
        },
        capture_output=True,
        text=True,
    )
    assert after.stdout.strip() == "rc=1 gateway= key= kubeconfig=", after
    assert "dev stack" in after.stderr and "is down" in after.stderr and "make dev-up" in after.stderr
    assert stale["key"] not in env_file.read_text()  # the key does not linger in the file
    strict = subprocess.run(["bash", "-c", f"set -e; . {env_file}; echo reached"], capture_output=True, text=True)
    assert strict.returncode != 0 and "reached" not in strict.stdout

    again = subprocess.run(
        [*ep.proc.args[:2], MODULE, "--state-dir", str(state), "down"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "nothing was running" in again.stderr
