"""The control plane leaves nothing behind, and its persistent (dev stack) mode survives a
restart and is stoppable from another process through its pidfiles."""

from __future__ import annotations

import pytest

from atlas_devstack.controlplane import ControlPlane
from atlas_devstack.processes import pid_alive

pytestmark = pytest.mark.cluster


def test_ephemeral_stop_removes_processes_and_dir(control_plane):
    # control_plane only guarantees the binaries exist (or skips/fails like the tier).
    cp = ControlPlane(apply_crds=False)
    with cp:
        workdir = cp.dir
        pids = [p.pid for p in cp._procs.values()]
        assert cp.kubectl("get", "--raw", "/readyz").stdout == "ok"
    assert pids and not any(pid_alive(pid) for pid in pids)
    assert not workdir.exists()


def test_persistent_mode_restarts_with_its_data_and_stops_by_pidfile(control_plane, tmp_path):
    state = tmp_path / "controlplane"
    first = ControlPlane(state, apply_crds=False).start()
    first.kubectl("create", "namespace", "keep-me")
    pids = [int((state / f"{name}.pid").read_text()) for name in ("etcd", "kube-apiserver")]
    assert ControlPlane.is_running(state)

    # Stop as `make dev-down` does: another process, only the state dir known.
    assert sorted(ControlPlane.stop_from_state_dir(state)) == ["etcd", "kube-apiserver"]
    for proc in first._procs.values():
        proc.wait(5)  # reap: this test process is their parent
    assert not any(pid_alive(pid) for pid in pids)
    assert not ControlPlane.is_running(state)

    with ControlPlane(state, apply_crds=False) as second:
        assert second.kubectl("get", "namespace", "keep-me", "-o", "name").stdout.strip() == "namespace/keep-me"
    assert state.exists() and not (state / "etcd.pid").exists()
