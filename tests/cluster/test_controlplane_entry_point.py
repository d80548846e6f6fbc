"""`python -m atlas_devstack.controlplane [DIR]`, run as a user runs it (docs/operator.md uses
it for the 10,000-key measurement): SIGTERM or SIGINT, during start-up or once it serves,
stops etcd and kube-apiserver (exit 128+N) and leaves no process, port or mount; the death of
one of them stops the other (exit 1); --detach leaves it running until --stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_devstack.waiting import wait_for
from tests.fixtures.leftovers import REPO_ROOT, SIGNALS, EntryPoint, listening_ports

pytestmark = pytest.mark.cluster
MODULE = "atlas_devstack.controlplane"
READY = "export KUBECONFIG="


@pytest.fixture
def entry_points(control_plane):  # control_plane: the binaries exist (or skip/fail like the tier)
    started: list[EntryPoint] = []
    yield started
    for ep in started:
        ep.kill()


def _kubeconfig(ep: EntryPoint) -> Path:
    line = next(line for line in ep.output.splitlines() if line.startswith(READY))
    return Path(line[len(READY) :])


def _serving(ep: EntryPoint) -> tuple[dict[int, str], set[int]]:
    ep.wait_output(READY)
    children = ep.descendants()
    assert {"etcd", "kube-apiserver"} <= {Path(cmd.split()[0]).name for cmd in children.values()}, children
    ports = listening_ports(set(children))
    assert len(ports) >= 3, ports  # etcd client + peer, kube-apiserver
    return children, ports


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_ephemeral_stops_everything_on_signal(entry_points, tmp_path, sig):
    ep = EntryPoint(tmp_path, MODULE)
    entry_points.append(ep)
    _, ports = _serving(ep)
    workdir = _kubeconfig(ep).parent
    ep.signal(sig)
    assert ep.wait_exit() == 128 + sig
    ep.assert_nothing_left(ports, workdir)
    assert not workdir.exists()


def test_state_dir_stops_everything_on_sigterm_and_keeps_its_data(entry_points, tmp_path):
    state = tmp_path / "cp"
    ep = EntryPoint(tmp_path, MODULE, str(state))
    entry_points.append(ep)
    _, ports = _serving(ep)
    subprocess.run(
        [
            str(REPO_ROOT / "bin" / "kubectl"),
            "--kubeconfig",
            str(state / "kubeconfig"),
            "create",
            "namespace",
            "keep-me",
        ],
        check=True,
        capture_output=True,
    )
    ep.signal(signal.SIGTERM)
    assert ep.wait_exit() == 128 + signal.SIGTERM
    ep.assert_nothing_left(ports, state)
    assert not list(state.glob("*.pid")) and (state / "etcd").is_dir()

    again = EntryPoint(tmp_path, MODULE, str(state))  # the data is reused
    entry_points.append(again)
    _, ports = _serving(again)
    out = subprocess.run(
        [
            str(REPO_ROOT / "bin" / "kubectl"),
            "--kubeconfig",
            str(state / "kubeconfig"),
            "get",
            "namespace",
            "keep-me",
            "-o",
            "name",
        ],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "namespace/keep-me", out.stderr
    again.signal(signal.SIGINT)
    assert again.wait_exit() == 128 + signal.SIGINT
    again.assert_nothing_left(ports, state)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_during_start_up_stops_what_was_started(entry_points, tmp_path, sig):
    """The case of the issue: stopped while kube-apiserver is still starting."""
    state = tmp_path / "cp"
    ep = EntryPoint(tmp_path, MODULE, str(state))
    entry_points.append(ep)
    wait_for("kube-apiserver to be started", lambda: (state / "kube-apiserver.pid").exists(), 90, interval=0.01)
    children = ep.descendants()
    assert {"etcd", "kube-apiserver"} <= {Path(cmd.split()[0]).name for cmd in children.values()}, children
    ports = listening_ports(set(children))
    ep.signal(sig)
    assert ep.wait_exit() == 128 + sig, ep.output
    assert READY not in ep.output  # it was stopped before it was ready
    ep.assert_nothing_left(ports, state)


def test_a_dead_apiserver_stops_etcd_and_fails(entry_points, tmp_path):
    state = tmp_path / "cp"
    ep = EntryPoint(tmp_path, MODULE, str(state))
    entry_points.append(ep)
    _, ports = _serving(ep)
    os.kill(int((state / "kube-apiserver.pid").read_text()), signal.SIGKILL)
    assert ep.wait_exit() == 1
    assert "kube-apiserver was killed by SIGKILL: stopped the rest" in ep.output
    ep.assert_nothing_left(ports, state)


def test_detach_returns_once_ready_and_stop_removes_it(control_plane, tmp_path):
    state = tmp_path / "cp"
    ep = EntryPoint(tmp_path, MODULE, "--detach", str(state))
    try:
        assert ep.wait_exit(120) == 0, ep.output
        assert READY in ep.output
        ports = json.loads((state / "ports.json").read_text())
        running = ep.left_behind()  # detached: meant to run on
        assert {"etcd", "kube-apiserver"} <= {Path(cmd.split()[0]).name for cmd in running.values()}, running
        stop = subprocess.run(
            [sys.executable, "-m", MODULE, "--stop", str(state)], capture_output=True, text=True, check=True
        )
        assert stop.stdout.strip() == "stopped: kube-apiserver, etcd"
        ep.assert_nothing_left(set(ports.values()), state)
    finally:
        ep.kill()
